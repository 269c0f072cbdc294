"""Pruning at scale: every pool-wide stage on synthetic clustered unit vectors.

Two modes. ``--mode lake`` (default): the asset-level, out-of-core path. Synthetic shards of
``--shard-rows`` rows are written to a Delta lake, then a fresh process runs k-means on a
bounded sample, the streaming assignment + ``pool_by_cluster`` layout, complexity, SemDeDup per
bucket and the ``dbp@0.5`` recipe with its export, then re-curates two new shards incrementally
(one drawn from every concept, then one from 20 concepts); it prints per stage seconds, bytes read/written, the ratio to one sgemm of the same FLOPs, peak RSS, and (for
N <= 200k) parity with the in-memory path. ``--mode memory``: the library functions on one
in-memory matrix (described below).

Uids: hashed by default (unordered 32-hex-character uids, like the platform's hashed ones); ``--uids
counter`` gives the row number in hex (the scheme of runs before 2026-12-05, session 5).

Data: a vMF-like mixture of ``concepts`` (default k) directions in ``d`` dims, each concept
with its own spread (so cluster complexity varies), plus planted near-duplicates: a
``dup_fraction`` of the rows are replaced by a copy of another row plus tiny noise
(cos ~ 0.998). Aligned caption vectors for CLIPCov are the image vectors plus noise.

Stages timed (the library functions the assets call): ``kmeans`` (faiss spherical k-means,
niter 50, max 256 points per centroid), ``assign``, ``complexity``, ``semdedup`` (M for every
sample), ``budgets`` (DBP water-filling + largest remainder), ``dbp_select`` (the whole
``dbp@0.5`` recipe after SemDeDup: complexity on the deduped pool, budgets, in-cluster
order, take), ``clipcov`` (the whole ``clipcov@0.5`` recipe: per-class greedy).
Peak RSS is ``ru_maxrss`` of the process, measured after the core stages (before the aligned
caption matrix exists) and at the end; each N runs in its own subprocess.

Usage::

    python benchmarks/prune_scale.py --n 1000000 --k 1000 [--dtype float16] [--compact] [--uids counter]   # lake mode
    python benchmarks/prune_scale.py --n 1000000 --k 1000 --repeat 3          # medians and ranges of 3 runs
    python benchmarks/prune_scale.py --n 10000000 --k 10000                   # the 10M run
    python benchmarks/prune_scale.py --mode memory   # N = 100k and 1M, d 512, k 1000
    python benchmarks/prune_scale.py --n 20000 --k 100 --d 64   # a quick run
    python benchmarks/prune_scale.py --json out.json

It prints one table per N (with ``--repeat R``, one per run and then the medians and ranges of
the R runs, which the lake mode's targets are read on), the growth ratios between the smallest
and the largest N, and the targets (1M end to end < 10 min on 2 cores, peak RSS < 2x the
embedding matrix, near-linear growth).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("generate", "kmeans", "assign", "complexity", "semdedup", "budgets", "dbp_select", "clipcov")
CORE = ("kmeans", "assign", "complexity", "semdedup", "budgets", "dbp_select")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageRss:
    """The peak RSS of each stage, not only of the whole process (``ru_maxrss`` only ever rises,
    so a later, smaller stage would be hidden): a thread samples ``VmRSS`` every ``period`` s and
    :meth:`start` resets the running peak. Memory that lives shorter than the period can be
    missed; ``ru_maxrss`` stays the authoritative overall peak."""

    def __init__(self, period: float = 0.01):
        import threading

        self.period, self.peak = period, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.now())

    def start(self) -> None:
        self.peak = self.now()

    def stop(self) -> int:
        self.peak = max(self.peak, self.now())
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._t.join()


def make_pool(n: int, d: int, concepts: int, dup_fraction: float, seed: int, block: int = 65536):
    """Synthetic pool, generated in place block by block (no float64 or (n, d) temporaries).

    Returns:
        ``(x, pairs, concept)``: (n, d) float32 unit rows, (m, 2) int64 planted
        (original, duplicate) row pairs, (n,) int32 true concept of each row.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((concepts, d), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    # cos(x, center) ~ 1 / sqrt(1 + sigma^2 d): spreads between ~0.45 and ~0.8 per concept.
    sigma = (rng.uniform(0.75, 2.0, concepts) / np.sqrt(d)).astype(np.float32)
    concept = rng.integers(0, concepts, n).astype(np.int32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        c = concept[s:e]
        blk = x[s:e]
        blk[:] = rng.standard_normal((e - s, d), dtype=np.float32)
        blk *= sigma[c, None]
        blk += centers[c]
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
    m = int(round(dup_fraction * n))
    perm = rng.permutation(n)
    orig, dup = perm[:m], perm[m : 2 * m]
    noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(0.002)
    x[dup] = x[orig] + noise
    x[dup] /= np.linalg.norm(x[dup], axis=1, keepdims=True)
    concept[dup] = concept[orig]
    return x, np.stack([orig, dup], axis=1).astype(np.int64), concept


def run_one(n: int, d: int, k: int, dup_fraction: float, eps: float, seed: int, niter: int, skip_clipcov: bool,
            uids: str = "hashed") -> dict:
    from curation.select.budgets import dbp_budgets, n_keep_for
    from curation.select.clustering import assign, cluster_complexity, train_centroids
    from curation.select.semdedup import EPS_GRID, is_duplicate, removed_fraction, semdedup_scores
    from curation.select.recipes import Pool, apply_recipe, parse_recipe

    sec: dict[str, float] = {}
    rss_base = peak_rss_bytes()  # interpreter + numpy/faiss/polars, before any data
    t = time.perf_counter()
    x, pairs, _ = make_pool(n, d, k, dup_fraction, seed)
    scheme, uids = uids, uid_column(0, n, uids).to_numpy(zero_copy_only=False).astype("<U32")
    sec["generate"] = time.perf_counter() - t
    x_bytes = x.nbytes

    t = time.perf_counter()
    cent = train_centroids(x, k, niter=niter, seed=seed)
    sec["kmeans"] = time.perf_counter() - t

    t = time.perf_counter()
    ids, cos = assign(x, cent)
    sec["assign"] = time.perf_counter() - t

    t = time.perf_counter()
    comp = cluster_complexity(ids, cos, cent)
    sec["complexity"] = time.perf_counter() - t

    t = time.perf_counter()
    m = semdedup_scores(x, ids, cos, uids)
    sec["semdedup"] = time.perf_counter() - t

    t = time.perf_counter()
    keep = ~is_duplicate(m, eps)
    sizes = np.bincount(ids[keep], minlength=k)
    budgets = dbp_budgets(sizes, comp.weight, n_keep_for(0.5, int(keep.sum())))
    sec["budgets"] = time.perf_counter() - t

    pool = Pool(uids=uids, cluster_ids=ids, cos_to_centroid=cos, centroids=cent, max_sim=m)
    t = time.perf_counter()
    sel = apply_recipe(parse_recipe("dbp@0.5", {"method": "dbp", "keep_fraction": 0.5, "after_semdedup_eps": eps}), pool)
    sec["dbp_select"] = time.perf_counter() - t
    assert sel.stats["n_kept"] == sel.stats["n_keep"]
    rss_core = peak_rss_bytes()

    dup_flag = is_duplicate(m, eps)
    caught = dup_flag[pairs[:, 0]] | dup_flag[pairs[:, 1]]
    planted = np.zeros(n, bool)
    planted[pairs.ravel()] = True
    out = {
        "n": n, "d": d, "k": k, "eps": eps, "niter": niter, "uids": scheme,
        "x_bytes": x_bytes,
        "planted_pairs": int(len(pairs)),
        "semdedup_recall": float(caught.mean()) if len(pairs) else float("nan"),
        "flagged": int(dup_flag.sum()),
        "flagged_not_planted": int((dup_flag & ~planted).sum()),
        "removed_fraction": {str(e): v for e, v in removed_fraction(m, EPS_GRID).items()},
        "budget_total": int(budgets.sum()),
        "dbp_kept": sel.stats["n_kept"],
        "peak_rss_core": rss_core,
        "rss_baseline": rss_base,
        "cluster_size_min_med_max": [int(comp.size.min()), int(np.median(comp.size)), int(comp.size.max())],
    }
    if not skip_clipcov:
        rng = np.random.default_rng(seed + 1)
        y = np.empty_like(x)
        for s in range(0, n, 65536):
            e = min(n, s + 65536)
            y[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
            y[s:e] *= np.float32(1.0 / np.sqrt(d))
            y[s:e] += x[s:e]
            y[s:e] /= np.linalg.norm(y[s:e], axis=1, keepdims=True)
        pool = Pool(uids=uids, cluster_ids=ids, cos_to_centroid=cos, centroids=cent, image_aligned=x, text_aligned=y)
        t = time.perf_counter()
        sel = apply_recipe(parse_recipe("clipcov@0.5", {"method": "clipcov", "keep_fraction": 0.5}), pool)
        sec["clipcov"] = time.perf_counter() - t
        assert sel.stats["n_kept"] == sel.stats["n_keep"]
        out["y_bytes"] = y.nbytes
    out["seconds"] = sec
    out["end_to_end_s"] = sum(v for s_, v in sec.items() if s_ != "generate")
    out["peak_rss"] = peak_rss_bytes()
    return out


# --------------------------------------------------------------------------- the lake path


INCR_STAGES = ("layout", "semdedup", "complexity", "select", "export")
#: ``incr_*``: a new shard of the whole concept mixture; ``local_*``: then one of LOCAL_CONCEPTS concepts
LAKE_STAGES = ("kmeans", "layout", "complexity", "semdedup", "dbp_select", "export", "compact",
               *(f"incr_{s}" for s in INCR_STAGES), *(f"local_{s}" for s in INCR_STAGES))
LOCAL_CONCEPTS = 20


def io_bytes() -> tuple[int, int]:
    """(bytes read, bytes written) by this process: through read/write syscalls (/proc/self/io),
    plus the ``pool_by_cluster`` bytes read through a memory map (which rchar does not see)."""
    from curation.select.layout import mapped_bytes

    try:
        d = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(d["rchar"]) + mapped_bytes(), int(d["wchar"])
    except OSError:  # pragma: no cover - not Linux
        return mapped_bytes(), 0


def sgemm_rate(d: int) -> float:
    """FLOP/s of one large float32 matmul (4096 x d) @ (d x 4096) on this machine, now (median of 5)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, d), dtype=np.float32)
    b = rng.standard_normal((4096, d), dtype=np.float32)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b.T
        ts.append(time.perf_counter() - t)
    return 2.0 * 4096 * 4096 * d / float(np.median(ts))


def shard_rows_of(rng, centers, sigma, rows: int, dup_fraction: float, concepts: int | None = None) -> np.ndarray:
    """One shard of the synthetic pool: (rows, d) float32 unit vectors from the concept
    mixture, with ``dup_fraction`` of them replaced by near-copies (cos ~ 0.998) of other
    rows of the same shard. ``concepts``: draw from only that many concepts (picked at random),
    a shard about a few topics; None: from all of them, like a shard of a web crawl."""
    k, d = centers.shape
    if concepts is None:
        c = rng.integers(0, k, rows)
    else:
        c = rng.choice(k, size=min(int(concepts), k), replace=False)[rng.integers(0, min(int(concepts), k), rows)]
    x = rng.standard_normal((rows, d), dtype=np.float32)
    x *= sigma[c, None]
    x += centers[c]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = int(round(dup_fraction * rows))
    perm = rng.permutation(rows)
    orig, dup = perm[:m], perm[m : 2 * m]
    x[dup] = x[orig] + rng.standard_normal((m, d), dtype=np.float32) * np.float32(0.002)
    x[dup] /= np.linalg.norm(x[dup], axis=1, keepdims=True)
    return x


def _concepts(d: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    sigma = (rng.uniform(0.75, 2.0, k) / np.sqrt(d)).astype(np.float32)
    return centers, sigma


UID_SCHEMES = ("hashed", "counter")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 (so distinct inputs give distinct uids)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uid_column(first_uid: int, n: int, uids: str = "hashed"):
    """The uids of rows ``first_uid .. first_uid + n - 1`` as an Arrow string column.

    ``hashed`` (default): 32 hex characters of two mixed uint64 of the row number, unique and in
    no order, like the platform's uids (a blake2b hash of dataset, shard and key,
    :func:`curation.ingest.ids.make_uid`): tables appended shard by shard are then NOT sorted by
    uid, and every uid sort and join costs what it costs on a real pool. ``counter``: the row number in hex (what runs before
    2026-12-05 used: appended shards come out sorted by uid, which flatters the sorts)."""
    import pyarrow as pa

    from curation.ingest.ids import bytes_to_hex, uid_arrow

    if uids not in UID_SCHEMES:
        raise ValueError(f"uids: got {uids!r}; expected one of {UID_SCHEMES}")
    if uids == "counter":
        return pa.array([f"{j:032x}" for j in range(first_uid, first_uid + n)], pa.string())
    i = np.arange(first_uid, first_uid + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        words = np.stack([_mix64(2 * i), _mix64(2 * i + np.uint64(1))], axis=1).astype(">u8")
    return uid_arrow(bytes_to_hex(words.view(np.uint8).reshape(n, 16))).cast(pa.string())


def _shard_table(x: np.ndarray, first_uid: int, shard: str, uids: str = "hashed"):
    import pyarrow as pa

    from curation.storage.lake import matrix_to_list_column

    n = x.shape[0]
    return pa.table({
        "uid": uid_column(first_uid, n, uids),
        "shard": pa.array([shard] * n, pa.string()),
        "image_emb": matrix_to_list_column(x),
        "text_emb": matrix_to_list_column(x[:, :8]),
        "encoder": pa.array(["synthetic"] * n, pa.string()),
    })


def _samples_table(first_uid: int, n: int, shard: str, uids: str = "hashed"):
    """The ``samples`` rows of a synthetic shard (what an export joins the kept uids with)."""
    import pyarrow as pa

    keys = [f"{j:09d}" for j in range(first_uid, first_uid + n)]
    return pa.table({
        "uid": uid_column(first_uid, n, uids),
        "dataset": pa.array(["syn"] * n, pa.string()), "shard": pa.array([shard] * n, pa.string()),
        "key": pa.array(keys, pa.string()), "caption": pa.array([f"synthetic sample {k}" for k in keys], pa.string()),
        "width": pa.array(np.full(n, 64, np.int32)), "height": pa.array(np.full(n, 64, np.int32)),
        "format": pa.array(["jpeg"] * n, pa.string()), "image_sha256": pa.array(["0" * 64] * n, pa.string()),
        "n_bytes": pa.array(np.full(n, 2048, np.int64)), "member": pa.array([k + ".jpg" for k in keys], pa.string()),
    })


def write_lake(root: str, n: int, d: int, k: int, shard_rows: int, dup_fraction: float, seed: int,
               per_commit: int = 20, uids: str = "hashed") -> int:
    """Synthetic embeddings written as ``n / shard_rows`` shard partitions, streamed shard by
    shard (``per_commit`` shards per Delta commit), never the whole pool in memory."""
    import pyarrow as pa
    from deltalake import write_deltalake

    centers, sigma = _concepts(d, k, seed)
    tables, samples = [], []
    for i, s in enumerate(range(0, n, shard_rows)):
        e = min(n, s + shard_rows)
        x = shard_rows_of(np.random.default_rng((seed, i)), centers, sigma, e - s, dup_fraction)
        tables.append(_shard_table(x, s, f"syn-{i:05d}", uids))
        samples.append(_samples_table(s, e - s, f"syn-{i:05d}", uids))
        if len(tables) == per_commit or e == n:
            write_deltalake(root + "/embeddings", pa.concat_tables(tables), partition_by=["shard"], mode="append")
            write_deltalake(root + "/samples", pa.concat_tables(samples), partition_by=["shard"], mode="append")
            tables, samples = [], []
    return n * d * 4


def run_lake(root: str, n: int, d: int, k: int, niter: int, eps: float, seed: int, dtype: str, shard_rows: int,
             dup_fraction: float, local_concepts: int = LOCAL_CONCEPTS, target_recall: float | None = None,
             compact: bool = False, uids: str = "hashed") -> dict:
    """The asset-level path on a lake (what concept_clusters, dedup_scores, complexity_scores and
    pruned_subsets[dbp@0.5] call), then two new shards re-curated incrementally one after the
    other: one drawn from every concept (it touches most clusters) and one from
    ``local_concepts`` concepts (a topical drop: it touches few). ``compact``: after the full run
    and before the updates, compact the layout (``compact_layout``, stage ``compact``: maintenance,
    counted in neither), so the updates read a compacted layout."""
    import polars as pl

    from curation.select.clustering import cluster_complexity
    from curation.select.layout import (
        LayoutConfig,
        build_layout,
        dedup_scores_by_bucket,
        fit_centroids,
        sample_rows,
        update_layout,
        write_dedup_scores,
    )
    from curation.select.clustering import DEFAULT_NEIGHBORS
    from curation.select import native_blas
    from curation.select.faiss_loader import faiss_blas_core
    from curation.select.pool_tables import clusters_frame, read_recipe_pool, stored_d_inter
    from curation.select.recipes import apply_recipe, parse_recipe
    from curation.storage.lake import Lake

    lake = Lake(root)
    cfg = LayoutConfig(dtype=dtype, target_recall=target_recall)
    recipe = parse_recipe("dbp@0.5", {"method": "dbp", "keep_fraction": 0.5, "after_semdedup_eps": eps})
    sec, rd, wr, mem = {}, {}, {}, {}
    rates = [sgemm_rate(d)]  # the box's sgemm rate, read again around the SemDeDup stage and at the end
    rss0 = peak_rss_bytes()
    sampler = StageRss()

    def stage(name, fn):
        r0, w0 = io_bytes()
        sampler.start()
        t = time.perf_counter()
        out = fn()
        sec[name] = time.perf_counter() - t
        mem[name] = sampler.stop()
        r1, w1 = io_bytes()
        rd[name], wr[name] = r1 - r0, w1 - w0
        # progress on stderr (the parent passes it through), so a long run can be followed
        print(f"[prune_scale n={n:,}] {name}: {sec[name]:.1f} s, stage peak RSS {mem[name] / 2**30:.2f} GiB "
              f"(process peak {peak_rss_bytes() / 2**30:.2f} GiB)", file=sys.stderr, flush=True)
        return out

    cent, _ = stage("kmeans", lambda: fit_centroids(lake, k, niter=niter, seed=seed))
    built = stage("layout", lambda: build_layout(lake, cent, cfg))
    audits = {"layout": _audit(built)}

    def complexity():  # what complexity_scores writes to `clusters` (d_inter reused for the same centroids)
        a = lake.dataset("assignments").to_table(columns=["cluster_id", "cos_to_centroid"])
        comp = cluster_complexity(a.column("cluster_id").to_numpy(), a.column("cos_to_centroid").to_numpy(), cent,
                                  d_inter=stored_d_inter(lake, cent, DEFAULT_NEIGHBORS))
        lake.write("clusters", clusters_frame(cent, comp))
        return comp

    stage("complexity", complexity)

    def semdedup(incremental):
        du = dedup_scores_by_bucket(lake, config=cfg, incremental=incremental)
        write_dedup_scores(lake, du)
        return du

    rates.append(sgemm_rate(d))  # right before and after the stage whose ratio is a target (not timed)
    stage("semdedup", lambda: semdedup(False))
    rates.append(sgemm_rate(d))

    def select():  # the selection, and its uids in pool order for the uid file (as pruned_subsets)
        from curation.select.export import kept_in_pool_order

        pool = read_recipe_pool(lake, recipe)
        s = apply_recipe(recipe, pool)
        return s, kept_in_pool_order(pool.uids, s.index)

    sel, sel_uids = stage("dbp_select", select)

    def export(s, kept_uids):  # what pruned_subsets does after the selection (no webdataset shards: no images here)
        from curation.select.export import export_subset
        from curation.select.pool_tables import store_selection

        frame, kept = store_selection(lake, recipe.name, s.to_arrow(), ["shard", "key", "caption"])
        held = [kept]
        del kept
        return export_subset(Path(root) / "artifacts" / recipe.name, frame, held.pop(), Path(root) / "landing",
                             recipe=recipe.to_dict(), write_shards=False, kept_uids=kept_uids)

    stage("export", lambda: export(sel, sel_uids))
    del sel_uids
    rss_full = peak_rss_bytes()
    parity = None
    if n <= int(os.environ.get("PRUNE_SCALE_PARITY_MAX_N", "200000")):
        parity = _parity(lake, cent, recipe, sel)
    # what the report needs of the full run's selection; the selection itself is dropped, as the
    # asset step that made it would have ended (the incremental stages must not carry its 5M uids)
    dump = os.environ.get("PRUNE_SCALE_DUMP")
    sel_kept, sel_budgets, sel_hash = sel.stats["n_kept"], sel.stats["budgets"].tolist(), _uids_hash(sel.uids)
    kept_dump = np.sort(np.asarray(sel.uids).astype("U32")) if dump else None
    del sel
    full_s = sum(sec.values())
    if compact:  # maintenance between the full run and the updates (counted in neither)
        from curation.select.layout import compact_layout

        stage("compact", lambda: compact_layout(lake))
    sizes = lake.read("assignments", columns=["cluster_id"])["cluster_id"].value_counts()["count"].to_numpy()
    # new 10k-sample shards, each re-curated incrementally
    from deltalake import write_deltalake

    centers, sigma = _concepts(d, k, seed)  # the same concepts, new rows

    def incremental(prefix: str, first_uid: int, rng_key, concepts: int | None) -> dict:
        xn = shard_rows_of(np.random.default_rng(rng_key), centers, sigma, shard_rows, dup_fraction, concepts)
        name = f"syn-{prefix}"
        write_deltalake(root + "/embeddings", _shard_table(xn, first_uid, name, uids), partition_by=["shard"], mode="append")
        write_deltalake(root + "/samples", _samples_table(first_uid, shard_rows, name, uids), partition_by=["shard"],
                        mode="append")
        del xn
        up = stage(f"{prefix}_layout", lambda: update_layout(lake, cent, cfg))
        du = stage(f"{prefix}_semdedup", lambda: semdedup(True))
        audits[f"{prefix}_layout"] = _audit(up)
        info = {"new_rows": up.n_new, "touched_clusters": int(len(up.touched_clusters)), "mode": du.mode,
                "rows_scored": du.rows_scored, "concepts": concepts, "score_s": du.score_seconds}
        del du  # written: the next stages read dedup_scores from the lake, like the next asset would
        stage(f"{prefix}_complexity", complexity)
        s, kept_uids = stage(f"{prefix}_select", select)
        info["kept"] = s.stats["n_kept"]
        stage(f"{prefix}_export", lambda: export(s, kept_uids))
        info["seconds"] = sum(sec[f"{prefix}_{x}"] for x in INCR_STAGES)
        # the touched-cluster work (assigning the shard, scoring its clusters) vs the pool-wide rest
        # (merging and writing the stored scores, complexity, the selection and its export)
        info["pool_wide_s"] = info["seconds"] - sec[f"{prefix}_layout"] - info["score_s"]
        info["fraction_of_full"] = info["seconds"] / full_s
        return info

    incr = incremental("incr", n, (seed, 10**9), None)
    local = incremental("local", n + shard_rows, (seed, 10**9 + 1), local_concepts)
    sampler.close()
    from curation.select.clustering import FLAT_MAX_K

    # after the measured stages: how exact the assignment of the new shards was (1.0 when flat)
    recall = assignment_recall(root, ["syn-incr", "syn-local"]) if k > FLAT_MAX_K else None
    incr_s = incr["seconds"]
    n_sample = min(n, sample_rows(k, d))  # the rows fit_centroids trains on (bounded to 1 GiB at 10M)
    # the bound is the box's best rate: measured at the start, around SemDeDup and at the end (a
    # shared box's rate moved 147-287 GFLOP/s between runs of one day and 161-231 within a minute;
    # a low reading flattered every ratio)
    rates.append(sgemm_rate(d))
    rate = max(rates)
    flops = {"kmeans": 2.0 * niter * n_sample * k * d, "layout": 2.0 * n * k * d,
             "semdedup": float((sizes.astype(np.float64) ** 2).sum() * d)}
    # after the measured stages; only the score column unless the dump needs the uid order
    m = pl.read_delta(root + "/dedup_scores").sort("uid") if dump else pl.read_delta(root + "/dedup_scores",
                                                                                     columns=["max_sim_to_earlier"])
    if dump:  # M (sorted by uid) and the full run's DBP kept uids, to compare layouts (float32 vs float16)
        Path(dump).mkdir(parents=True, exist_ok=True)
        np.save(f"{dump}/m_{dtype}_{n}.npy", m["max_sim_to_earlier"].to_numpy())
        np.save(f"{dump}/kept_{dtype}_{n}.npy", kept_dump)
    return {
        "n": n, "d": d, "k": k, "dtype": dtype, "uids": uids, "niter": niter, "eps": eps, "shard_rows": shard_rows,
        "parity_with_in_memory": parity,
        "seconds": sec, "bytes_read": rd, "bytes_written": wr, "stage_peak_rss": mem,
        "sgemm_gflops": rate / 1e9, "sgemm_gflops_readings": [r / 1e9 for r in rates],
        "faiss_blas": faiss_blas_core(),
        "semdedup_gram": native_blas.status(), "semdedup_gram_native": native_blas.available(),
        "ratio_to_sgemm": {s: sec[s] / (f / rate) for s, f in flops.items()},
        "full_s": full_s, "incremental_s": incr_s, "incremental_fraction": incr_s / full_s,
        "incr_new_rows": incr["new_rows"], "incr_touched_clusters": incr["touched_clusters"],
        "incr_mode": incr["mode"], "incr_rows_scored": incr["rows_scored"], "incremental_local": local,
        "incremental": incr,
        "two_level_recall": recall, "assignment_audit": audits, "target_recall": target_recall,
        "dbp_kept": sel_kept, "dbp_kept_after_new_shard": incr["kept"],
        "removed_at_eps": float((m["max_sim_to_earlier"].to_numpy() > 1 - eps).mean()),
        "budgets": sel_budgets,
        "kept_uids_hash": sel_hash,
        "x_bytes": n * d * 4, "rss_baseline": rss0, "peak_rss_full": rss_full, "peak_rss": peak_rss_bytes(),
        "cluster_size_min_med_max": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
    }


def assignment_recall(root: str, shards: list[str], nprobes=(None,)) -> dict:
    """How often the two-level assignment of ``shards``' rows picks the exact nearest centroid
    (``read_centroids``), per ``nprobe`` (None: the default), with the mean cos lost.
    ``python -c "import prune_scale as p; print(p.assignment_recall('/tmp/p10m', ['syn-incr',
    'syn-local'], [None, 25, 50, 100]))"`` after a 10M run."""
    import polars as pl

    from curation.select.clustering import TwoLevelAssigner, assign
    from curation.select.pool_tables import read_centroids
    from curation.storage.lake import Lake, list_column_to_matrix

    lake = Lake(root)
    cent = read_centroids(lake)
    x = list_column_to_matrix(lake.read_where("embeddings", ["image_emb"], pl.col("shard").is_in(shards))["image_emb"])
    exact, best = assign(x, cent, gpu=False)
    out = {"rows": int(x.shape[0]), "k": int(cent.shape[0])}
    for nprobe in nprobes:
        a = TwoLevelAssigner(cent, nprobe=nprobe, gpu=False)
        ids, cos = a(x)
        out[f"nprobe={a.nprobe}"] = {"recall": float((ids == exact).mean()), "mean_cos_lost": float((best - cos).mean())}
    return out


def _audit(up) -> dict | None:
    """What the layout write reported of its assignment (what concept_clusters' metadata shows)."""
    return None if up.assignment is None else up.assignment.metadata()


def _uids_hash(uids) -> str:
    """sha256 of the sorted uids concatenated (the same digest for str and S32 uids)."""
    from curation.ingest.ids import uid_strings

    return __import__("hashlib").sha256(np.sort(uid_strings(np.asarray(uids))).tobytes()).hexdigest()[:16]


def _parity(lake, cent, recipe, sel) -> dict:
    """The in-memory path on the same pool and centroids (one (N, d) matrix): are the SemDeDup
    scores, the DBP budgets and the kept uids identical to the out-of-core ones? Above
    ``FLAT_MAX_K`` both take the layout's (two-level) assignment."""
    import polars as pl

    from curation.embed.pool_reader import read_pool
    from curation.select.clustering import assign
    from curation.select.recipes import Pool, apply_recipe
    from curation.select.semdedup import semdedup_scores

    from curation.select.clustering import FLAT_MAX_K

    pe = read_pool(lake, columns=("image",))
    if cent.shape[0] <= FLAT_MAX_K:
        ids, cos = assign(pe.image, cent)
    else:  # the two-level assignment is approximate (its recall is reported apart): compare what follows it
        a = pl.DataFrame({"uid": pe.uids}).join(pl.read_delta(lake.uri("assignments")), on="uid", how="left", maintain_order="left")
        ids, cos = a["cluster_id"].to_numpy(), a["cos_to_centroid"].to_numpy()
    m = semdedup_scores(pe.image, ids, cos, pe.uids)
    stored = pl.read_delta(lake.uri("dedup_scores"))
    j = pl.DataFrame({"uid": pe.uids, "m": m}).join(stored, on="uid")
    ref = apply_recipe(recipe, Pool(uids=pe.uids, cluster_ids=ids, cos_to_centroid=cos, centroids=cent, max_sim=m))
    return {"rows_compared": j.height,
            "dedup_scores_identical": bool(j.height == len(m) and (j["m"] == j["max_sim_to_earlier"]).all()),
            "budgets_identical": bool(np.array_equal(ref.stats["budgets"], sel.stats["budgets"])),
            "kept_uids_identical": _uids_hash(ref.uids) == _uids_hash(sel.uids)}


def _gram_kernel(r: dict) -> str:
    """What ran SemDeDup's Gram triangles (``native_blas``: numpy's OpenBLAS ssyrk, or why not)."""
    g = r.get("semdedup_gram")
    if g is None:
        return "not recorded"
    return f"ssyrk of {g}" if r.get("semdedup_gram_native") else f"numpy's x @ x.T ({g})"


def _fmt_lake(r: dict) -> str:
    gib, mib = 2**30, 2**20
    lines = [f"N={r['n']:,} d={r['d']} k={r['k']} layout {r['dtype']}, {r.get('uids', 'counter')} uids  (X = {r['x_bytes'] / gib:.2f} GiB; "
             f"one sgemm: {r['sgemm_gflops']:.1f} GFLOP/s, the best of "
             + " / ".join(f"{g:.0f}" for g in r.get('sgemm_gflops_readings', [])) + " at the start, around SemDeDup, at the end; "
             f"faiss's OpenBLAS kernels: {r.get('faiss_blas')}; SemDeDup's Gram: {_gram_kernel(r)})",
             "| stage | seconds | read MiB | written MiB | stage peak RSS GiB | x sgemm time of same FLOPs |",
             "|---|---|---|---|---|---|"]
    for s in LAKE_STAGES:
        if s in r["seconds"]:
            ratio = r["ratio_to_sgemm"].get(s)
            lines.append(f"| {s} | {r['seconds'][s]:.2f} | {r['bytes_read'][s] / mib:.0f} | {r['bytes_written'][s] / mib:.0f} | "
                         f"{r.get('stage_peak_rss', {}).get(s, 0) / gib:.2f} | "
                         + (f"{ratio:.2f}" if ratio is not None else "-") + " |")
    lines.append(f"| full (kmeans..export) | {r['full_s']:.1f} | | | | |")

    def split(i: dict) -> str:
        return (f"; scoring the touched clusters {i['score_s']:.2f} s, pool-wide rest {i['pool_wide_s']:.2f} s = "
                f"{100 * i['pool_wide_s'] / r['full_s']:.1f}% of full")

    lines.append(f"| new {r['shard_rows']:,}-row shard, incremental | {r['incremental_s']:.1f} "
                 f"({100 * r['incremental_fraction']:.1f}% of full{split(r['incremental'])}) | | | | |")
    loc = r.get("incremental_local")
    if loc:
        lines.append(f"| new {r['shard_rows']:,}-row shard of {loc['concepts']} concepts, incremental | {loc['seconds']:.1f} "
                     f"({100 * loc['fraction_of_full']:.1f}% of full; {loc['touched_clusters']} clusters touched, "
                     f"{loc['rows_scored']:,} rows scored{split(loc)}) | | | | |")
    lines.append(f"peak RSS {r['peak_rss'] / gib:.2f} GiB = {r['peak_rss'] / r['x_bytes']:.2f} x X "
                 f"(after the full run {r['peak_rss_full'] / gib:.2f} GiB; imports only {r['rss_baseline'] / gib:.2f} GiB)")
    lines.append(f"incremental: {r['incr_new_rows']:,} new rows touched {r['incr_touched_clusters']} clusters, "
                 f"{r['incr_rows_scored']:,} rows scored ({r['incr_mode']}); removed at eps {r['eps']}: {r['removed_at_eps']:.4f}; "
                 f"dbp kept {r['dbp_kept']:,}, uids hash {r['kept_uids_hash']}")
    for name, a in (r.get("assignment_audit") or {}).items():
        if a and a["assign_method"] != "flat":
            lines.append(f"{name}: two-level assignment, nprobe {a['assign_nprobe']} of {a['assign_nlist']} cells"
                         + (f" (target recall {r['target_recall']})" if r.get("target_recall") else "")
                         + f": audited recall {a['assign_recall']:.3f} +- {a['assign_recall_stderr']:.3f} on "
                         f"{a['assign_audited_rows']:,} rows")
    if r.get("two_level_recall"):
        lines.append(f"two-level assignment of the new shards vs the exact nearest centroid: {r['two_level_recall']}")
    if r.get("parity_with_in_memory"):
        lines.append(f"parity with the in-memory path: {r['parity_with_in_memory']}")
    return "\n".join(lines)


def _fmt_table(r: dict) -> str:
    gib = 2**30
    lines = [f"N={r['n']:,} d={r['d']} k={r['k']}, {r.get('uids', 'counter')} uids  (X = {r['x_bytes'] / gib:.2f} GiB)",
             "| stage | seconds |", "|---|---|"]
    for s in STAGES:
        if s in r["seconds"]:
            lines.append(f"| {s} | {r['seconds'][s]:.2f} |")
    lines.append(f"| end to end (excl. generate) | {r['end_to_end_s']:.1f} |")
    lines.append(
        f"peak RSS core {r['peak_rss_core'] / gib:.2f} GiB = {r['peak_rss_core'] / r['x_bytes']:.2f} x X; "
        f"with CLIPCov {r['peak_rss'] / gib:.2f} GiB = {r['peak_rss'] / r['x_bytes']:.2f} x X"
        + (f" = {r['peak_rss'] / (r['x_bytes'] + r['y_bytes']):.2f} x (X + Y)" if "y_bytes" in r else "")
        + f"; baseline (imports, no data) {r['rss_baseline'] / gib:.2f} GiB"
    )
    lines.append(
        f"SemDeDup recall of {r['planted_pairs']:,} planted pairs at eps={r['eps']}: {r['semdedup_recall']:.4f}; "
        f"flagged {r['flagged']:,}, not planted {r['flagged_not_planted']:,}"
    )
    return "\n".join(lines)


def _lake_once(args, n: int, rep: int) -> dict | int:
    """One lake-mode run of ``n`` rows: the lake written by one process (seeded: every repeat
    writes the same pool), the stages run by a fresh one. Returns its results, or the failing
    process's exit code (its stderr went straight through)."""
    import shutil
    import tempfile

    if args.root:
        root = args.root if args.repeat == 1 else str(Path(args.root) / f"repeat{rep}")
    else:
        root = tempfile.mkdtemp(prefix="prune_scale_")
    gen = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import prune_scale as p; "
           "p.write_lake(%r, %d, %d, %d, %d, %r, %d, uids=%r)" % (str(Path(__file__).parent), root, n, args.d,
                                                                  args.k, args.shard_rows, args.dup_fraction,
                                                                  args.seed, args.uids)]
    t = time.perf_counter()
    subprocess.run(gen, check=True, env=os.environ.copy())
    gen_s = time.perf_counter() - t
    cmd = [sys.executable, "-c", "import sys, json; sys.path.insert(0, %r); import prune_scale as p; "
           "print(json.dumps(p.run_lake(%r, %d, %d, %d, %d, %r, %d, %r, %d, %r, target_recall=%r, compact=%r, "
           "uids=%r)))" % (
               str(Path(__file__).parent), root, n, args.d, args.k, args.niter, args.eps, args.seed,
               args.dtype, args.shard_rows, args.dup_fraction, args.target_recall, args.compact, args.uids)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0:
        return proc.returncode
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["generate_s"] = gen_s
    return r


def _median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def _target_readings(runs: list[dict]) -> list[tuple[str, list[float], float]]:
    """``(name, per-run values, limit)`` of each target a lake run reads (met: below the limit)."""
    return [
        ("peak RSS GiB", [r["peak_rss"] / 2**30 for r in runs], 4.0),
        ("new shard of every concept, % of full", [100 * r["incremental_fraction"] for r in runs], 5.0),
        (f"new shard of {runs[0]['incremental_local']['concepts']} concepts, % of full",
         [100 * r["incremental_local"]["fraction_of_full"] for r in runs], 5.0),
        ("SemDeDup x sgemm", [r["ratio_to_sgemm"]["semdedup"] for r in runs], 2.0),
    ]


def _fmt_repeats(runs: list[dict]) -> str:
    """Medians and ranges over repeated runs of one N (the box's run-to-run spread is as large
    as many changes: a difference inside these ranges is noise), and whether every run kept the
    same uids (the pipeline is deterministic: it must)."""
    rows = [("full (kmeans..export) s", [r["full_s"] for r in runs])]
    for s in ("kmeans", "layout", "semdedup", "dbp_select", "export"):
        rows.append((f"{s} s", [r["seconds"][s] for r in runs]))
    rows += [("new shard of every concept s", [r["incremental_s"] for r in runs]),
             ("  its scoring s", [r["incremental"]["score_s"] for r in runs]),
             ("  its pool-wide rest s", [r["incremental"]["pool_wide_s"] for r in runs]),
             (f"new shard of {runs[0]['incremental_local']['concepts']} concepts s", [r["incremental_local"]["seconds"] for r in runs]),
             ("one sgemm GFLOP/s", [r["sgemm_gflops"] for r in runs])]
    rows += [(name, vals) for name, vals, _lim in _target_readings(runs)]
    lines = [f"N={runs[0]['n']:,}: medians of {len(runs)} runs (min - max)", "| | median | min - max |", "|---|---|---|"]
    lines += [f"| {name} | {_median(v):.2f} | {min(v):.2f} - {max(v):.2f} |" for name, v in rows]
    hashes = {r["kept_uids_hash"] for r in runs}
    lines.append(f"kept uids identical in every run: {len(hashes) == 1} ({', '.join(sorted(hashes))})")
    return "\n".join(lines)


def _fmt_targets(runs: list[dict]) -> str:
    """The targets at the largest N, read on the median of the runs, with how many runs met each."""
    big = runs[0]
    parts = []
    for name, vals, lim in _target_readings(runs):
        met = sum(v < lim for v in vals)
        parts.append(f"{name} {_median(vals):.2f} (< {lim:g}: {_median(vals) < lim}"
                     + (f"; met in {met} of {len(vals)} runs" if len(vals) > 1 else "") + ")")
    return f"targets at N={big['n']:,}" + (f" (medians of {len(runs)} runs)" if len(runs) > 1 else "") + ": " + "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--niter", type=int, default=50)
    ap.add_argument("--dup-fraction", type=float, default=0.01)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-clipcov", action="store_true")
    ap.add_argument("--json", type=str, default=None, help="write all results here")
    ap.add_argument("--mode", choices=("lake", "memory"), default="lake",
                    help="lake: the asset-level out-of-core path from shard partitions (default); memory: the "
                         "library functions on one in-memory matrix (the pre-layout path)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="pool_by_cluster vector type")
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--target-recall", type=float, default=None,
                    help="two-level assignment (k > 2048): calibrate nprobe for this recall (default: fixed nprobe)")
    ap.add_argument("--root", type=str, default=None, help="lake directory (default: a temporary one, removed)")
    ap.add_argument("--compact", action="store_true",
                    help="compact the layout after the full run (stage `compact`, not counted in it) before the updates")
    ap.add_argument("--uids", choices=UID_SCHEMES, default="hashed",
                    help="synthetic uids: hashed (default; unordered, like the platform's hashed uids) or counter "
                         "(the row number: appended shards come out sorted by uid; runs before 2026-12-05)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="lake mode: run each N this many times (the same seeded pool, a fresh lake and process "
                         "each) and print medians and ranges; the targets are read on the medians")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat: got {args.repeat}; expected >= 1")
    logging.basicConfig(level=logging.WARNING)

    if args.mode == "lake":
        results = []
        for n in args.n:
            runs = []
            for rep in range(args.repeat):
                r = _lake_once(args, n, rep)
                if isinstance(r, int):
                    return r
                r["repeat"] = rep
                runs.append(r)
                print(_fmt_lake(r) if args.repeat == 1 else f"[repeat {rep + 1} of {args.repeat}]\n" + _fmt_lake(r), flush=True)
                print(flush=True)
            if args.repeat > 1:
                print(_fmt_repeats(runs), flush=True)
                print(flush=True)
            results.append(runs)
        if len(results) > 1:
            a, b = results[0], results[-1]
            per = (_median([r["full_s"] for r in b]) / b[0]["n"]) / (_median([r["full_s"] for r in a]) / a[0]["n"])
            print(f"per-sample cost {b[0]['n']:,} vs {a[0]['n']:,}: x{per:.2f} (target <= 1.5"
                  + (f"; medians of {args.repeat} runs" if args.repeat > 1 else "") + ")")
        print(_fmt_targets(results[-1]))
        if args.json:
            flat = [r for runs in results for r in runs]
            Path(args.json).write_text(json.dumps(flat, indent=2))
        return 0

    if args.single:
        r = run_one(args.n[0], args.d, args.k, args.dup_fraction, args.eps, args.seed, args.niter, args.skip_clipcov,
                    args.uids)
        print(json.dumps(r))
        return 0

    results = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--mode", "memory", "--single", "--n", str(n), "--d", str(args.d), "--k", str(args.k),
               "--niter", str(args.niter), "--dup-fraction", str(args.dup_fraction), "--eps", str(args.eps),
               "--seed", str(args.seed), "--uids", args.uids] + (["--skip-clipcov"] if args.skip_clipcov else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(_fmt_table(r), flush=True)
        print(flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        f = b["n"] / a["n"]
        print(f"growth {a['n']:,} -> {b['n']:,} (x{f:g} samples):")
        for s in STAGES:
            if s in a["seconds"] and s in b["seconds"] and a["seconds"][s] > 0:
                print(f"  {s:<11} x{b['seconds'][s] / a['seconds'][s]:.1f}")
        print(f"  end to end  x{b['end_to_end_s'] / a['end_to_end_s']:.1f}")
    big = results[-1]
    print(
        f"targets at N={big['n']:,}: end to end {big['end_to_end_s']:.0f} s (< 600 s: {big['end_to_end_s'] < 600}); "
        f"core peak RSS {big['peak_rss_core'] / big['x_bytes']:.2f} x X (< 2: {big['peak_rss_core'] < 2 * big['x_bytes']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
