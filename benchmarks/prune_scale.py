"""Pruning at scale: every pool-wide stage on synthetic clustered unit vectors.

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

    python benchmarks/prune_scale.py                 # N = 100k and 1M, d 512, k 1000
    python benchmarks/prune_scale.py --n 20000 --k 100 --d 64   # a quick run
    python benchmarks/prune_scale.py --json out.json

It prints one table per N, the growth ratios between the smallest and the largest N, and the
targets (1M end to end < 10 min on 2 cores, peak RSS < 2x the embedding matrix, near-linear
growth).
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


def run_one(n: int, d: int, k: int, dup_fraction: float, eps: float, seed: int, niter: int, skip_clipcov: bool) -> dict:
    from curation.select.budgets import dbp_budgets, n_keep_for
    from curation.select.clustering import assign, cluster_complexity, train_centroids
    from curation.select.semdedup import EPS_GRID, is_duplicate, removed_fraction, semdedup_scores
    from curation.select.recipes import Pool, apply_recipe, parse_recipe

    sec: dict[str, float] = {}
    rss_base = peak_rss_bytes()  # interpreter + numpy/faiss/polars, before any data
    t = time.perf_counter()
    x, pairs, _ = make_pool(n, d, k, dup_fraction, seed)
    uids = np.array([f"{i:032x}" for i in range(n)])
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
        "n": n, "d": d, "k": k, "eps": eps, "niter": niter,
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


def _fmt_table(r: dict) -> str:
    gib = 2**30
    lines = [f"N={r['n']:,} d={r['d']} k={r['k']}  (X = {r['x_bytes'] / gib:.2f} GiB)", "| stage | seconds |", "|---|---|"]
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
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.single:
        r = run_one(args.n[0], args.d, args.k, args.dup_fraction, args.eps, args.seed, args.niter, args.skip_clipcov)
        print(json.dumps(r))
        return 0

    results = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--single", "--n", str(n), "--d", str(args.d), "--k", str(args.k),
               "--niter", str(args.niter), "--dup-fraction", str(args.dup_fraction), "--eps", str(args.eps),
               "--seed", str(args.seed)] + (["--skip-clipcov"] if args.skip_clipcov else [])
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
