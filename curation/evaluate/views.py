"""What the platform decided about samples, gathered for people to look at.

Each function reads the lake (and the landing shards, for thumbnails) and returns plain
Python data: lists of dicts whose ``thumb`` entries are JPEG ``data:`` URIs (or ``None`` when
the bytes do not decode). Two renderers use them: the Dagster metadata builders
(``assets/previews.py``: markdown with embedded thumbnails) and the self-contained HTML
explorer (:mod:`curation.evaluate.explorer`). Every view is bounded (clusters, groups and
samples per view) so its size does not grow with the pool.

Views:
    * :func:`cluster_gallery`: per concept cluster the most central, least central and
      random members, with size, d_intra, d_inter, complexity, weight and per recipe the
      kept count (the DBP budget for dbp recipes) and keep fraction.
    * :func:`dedup_groups`: SemDeDup groups removed at one eps: the kept member beside its
      removed near-copies, with cosines; :func:`removed_fraction_curve` for the plot.
    * :func:`kept_removed`: per recipe, seeded samples of kept and removed with the reason.
    * :func:`waterfall`: what each stage removed (quarantine, dedup, pruning) per recipe.
    * :func:`quarantine_examples`: every quarantine reason with counts and examples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import polars as pl

from curation.ingest.thumbnails import (
    DEFAULT_SIZE,
    load_key_thumbnails,
    load_thumbnails,
)
from curation.select.recipes import Recipe, load_recipes
from curation.select.semdedup import EPS_GRID, cluster_member_groups, is_duplicate
from curation.storage.lake import Lake

log = logging.getLogger(__name__)

DEFAULT_EPS = 0.05
CURVE_EPS = tuple(float(e) for e in np.round(np.geomspace(1e-3, 0.3, 24), 5))


def _samples_for(db: Lake, uids: Sequence[str]) -> pl.DataFrame:
    """``samples`` rows (uid, dataset, shard, key, member, caption, width, height) of ``uids``."""
    cols = ["uid", "dataset", "shard", "key", "member", "caption", "width", "height"]
    if not uids or not db.exists("samples"):
        return pl.DataFrame(schema={c: (pl.Int32 if c in ("width", "height") else pl.String) for c in cols})
    return db.read_uids("samples", list(dict.fromkeys(uids)), cols)


def attach_thumbnails(
    db: Lake, landing: str | os.PathLike, uids: Sequence[str], size: int = DEFAULT_SIZE, max_count: int = 400
) -> dict[str, dict]:
    """``{uid: {"uid", "caption", "shard", "key", "thumb"}}`` for ``uids`` (thumbnails read
    from the shards; at most ``max_count``)."""
    rows = _samples_for(db, uids)
    thumbs = load_thumbnails(landing, rows.select("uid", "shard", "member").iter_rows(named=True), size=size, max_count=max_count)
    out = {}
    for r in rows.iter_rows(named=True):
        out[r["uid"]] = {"uid": r["uid"], "caption": r["caption"], "shard": r["shard"], "key": r["key"], "thumb": thumbs.get(r["uid"])}
    return out


def _recipes_in_lake(db: Lake) -> dict[str, Recipe | None]:
    """The recipes with a ``subsets`` partition, with their config when the recipe file knows them."""
    if not db.exists("subsets"):
        return {}
    names = sorted(db.partitions("subsets"))
    try:
        known = load_recipes()
    except Exception as e:  # noqa: BLE001 - a broken recipe file must not hide the data views
        log.warning("views: cannot read the recipe file: %s", e)
        known = {}
    return {n: known.get(n) for n in names}


def recipe_eps(recipe: Recipe | None) -> float | None:
    """The SemDeDup eps a recipe applies first (``semdedup``'s eps or ``after_semdedup_eps``)."""
    if recipe is None:
        return None
    return recipe.eps if recipe.method == "semdedup" else recipe.after_semdedup_eps


# --------------------------------------------------------------------------- clusters


def pick_clusters(clusters: pl.DataFrame, n: int) -> list[int]:
    """``n`` cluster ids spread over the complexity range: the most complex half, the least
    complex half (non-empty clusters only), most complex first."""
    nz = clusters.filter(pl.col("size") > 0).sort("complexity", descending=True)
    ids = nz["cluster_id"].to_list()
    if len(ids) <= n:
        return ids
    top = ids[: (n + 1) // 2]
    bottom = ids[len(ids) - n // 2 :]
    return top + bottom


def cluster_gallery(
    db: Lake,
    landing: str | os.PathLike,
    n_clusters: int = 8,
    per: int = 3,
    size: int = 64,
    seed: int = 0,
    cluster_ids: Sequence[int] | None = None,
    recipes: Sequence[str] | None = None,
) -> list[dict]:
    """A thumbnail grid per concept cluster.

    Args:
        db: the lake (tables clusters, assignments, samples; subsets when recipes ran).
        landing: the landing zone holding the shards.
        n_clusters: clusters to show (default: 4 most and 4 least complex).
        per: samples per row (most central, least central, random).
        size: thumbnail size in px.
        seed: seed of the random row.
        cluster_ids: show these clusters instead.
        recipes: the recipes whose kept counts to show (``None``: every recipe in ``subsets``;
            empty: none).

    Returns:
        One dict per cluster: ``cluster_id, size, d_intra, d_inter, complexity, weight``,
        ``central``, ``peripheral``, ``random`` (lists of sample dicts with ``cos``) and
        ``recipes`` (``{recipe: {"kept": int, "keep_fraction": float}}``).
    """
    if not (db.exists("clusters") and db.exists("assignments")):
        return []
    clusters = db.read("clusters", columns=["cluster_id", "size", "d_intra", "d_inter", "complexity", "weight"])
    chosen = list(cluster_ids) if cluster_ids is not None else pick_clusters(clusters, n_clusters)
    if not chosen:
        return []
    asg = db.read_where("assignments", ["uid", "cluster_id", "cos_to_centroid"], pl.col("cluster_id").is_in(chosen))
    rng = np.random.default_rng(seed)
    rows_by_cluster: dict[int, dict[str, list[tuple[str, float]]]] = {}
    for (cid,), g in asg.group_by(["cluster_id"]):
        g = g.sort(["cos_to_centroid", "uid"], descending=[True, False])
        uids, cos = g["uid"].to_list(), g["cos_to_centroid"].to_list()
        central = list(zip(uids[:per], cos[:per]))
        rest = list(zip(uids[per:], cos[per:]))
        peripheral = list(reversed(rest[-per:])) if rest else []
        middle = rest[: max(0, len(rest) - per)]
        pick = rng.choice(len(middle), size=min(per, len(middle)), replace=False) if middle else []
        rand = [middle[i] for i in sorted(pick)]
        rows_by_cluster[int(cid)] = {"central": central, "peripheral": peripheral, "random": rand}
    wanted = [u for r in rows_by_cluster.values() for lst in r.values() for u, _ in lst]
    info = attach_thumbnails(db, landing, wanted, size=size, max_count=max(1, min(2000, len(wanted))))
    kept_per: dict[str, dict[int, int]] = {}
    if db.exists("subsets") and (recipes is None or len(recipes) > 0):
        names = [r for r in db.partitions("subsets") if recipes is None or r in set(recipes)]
        # the chosen clusters' members against the subsets, streamed (not every kept uid joined
        # with every assignment: 10M rows held twice)
        counts = (db.scan("subsets").select("recipe", "uid").filter(pl.col("recipe").is_in(names))
                  .join(asg.select("uid", "cluster_id").lazy(), on="uid", how="inner")
                  .group_by("recipe", "cluster_id").len().collect(engine="streaming"))
        for r in counts.iter_rows(named=True):
            kept_per.setdefault(r["recipe"], {})[int(r["cluster_id"])] = int(r["len"])
        for name in names:
            kept_per.setdefault(name, {})
    stats = {int(r["cluster_id"]): r for r in clusters.iter_rows(named=True)}
    out = []
    for cid in chosen:
        st = stats.get(int(cid))
        if st is None:
            continue
        rows = rows_by_cluster.get(int(cid), {"central": [], "peripheral": [], "random": []})
        entry = {k: st[k] for k in ("cluster_id", "size", "d_intra", "d_inter", "complexity", "weight")}
        for row_name, lst in rows.items():
            entry[row_name] = [{**info.get(u, {"uid": u, "caption": "", "thumb": None}), "cos": float(c)} for u, c in lst]
        entry["recipes"] = {
            rec: {"kept": per_c.get(int(cid), 0), "keep_fraction": per_c.get(int(cid), 0) / max(1, st["size"])}
            for rec, per_c in sorted(kept_per.items())
        }
        out.append(entry)
    return out


# --------------------------------------------------------------------------- SemDeDup


def removed_fraction_curve(max_sim: np.ndarray, eps_grid: Sequence[float] = CURVE_EPS) -> list[tuple[float, float]]:
    """``[(eps, fraction removed)]`` over a log-spaced eps grid (plus the recipe grid)."""
    m = np.asarray(max_sim, dtype=np.float32)
    grid = sorted(set(float(e) for e in eps_grid) | set(float(e) for e in EPS_GRID))
    if m.size == 0:
        return [(e, 0.0) for e in grid]
    return [(e, float(is_duplicate(m, e).mean())) for e in grid]


def duplicate_groups_in_cluster(x: np.ndarray, eps: float) -> list[tuple[int, list[tuple[int, float]]]]:
    """SemDeDup groups of one cluster at ``eps``.

    Args:
        x: (n, d) float32 unit-norm embeddings of the cluster's members in SemDeDup order
            (least prototypical first: a member is removed when an EARLIER one has
            cosine > 1 - eps, so each group keeps its first member).
        eps: the threshold.

    Returns:
        ``[(kept row, [(removed row, cosine to the kept row), ...])]``, rows into ``x``;
        each removed row is attached to the kept row its chain of nearest earlier
        duplicates leads to. Groups with removed members only.
    """
    n = x.shape[0]
    if n < 2:
        return []
    sim = x @ x.T
    thr = 1.0 - eps
    parent = np.arange(n)
    removed = np.zeros(n, dtype=bool)
    for j in range(1, n):
        earlier = sim[j, :j]
        i = int(np.argmax(earlier))
        if earlier[i] > thr:
            removed[j] = True
            parent[j] = i
    groups: dict[int, list[int]] = {}
    for j in np.flatnonzero(removed):
        root = int(j)
        while removed[root]:
            root = int(parent[root])
        groups.setdefault(root, []).append(int(j))
    return [(k, [(j, float(sim[k, j])) for j in members]) for k, members in groups.items()]


def _cluster_vectors(db: Lake, clusters: Sequence[int], uids: pl.Series) -> tuple[list[str], np.ndarray]:
    """``(uids, (n, d) float32 image vectors)`` of the members of ``clusters`` (``uids``: the
    members, from ``assignments``): the layout's rows of those clusters when it stores float32
    (the same vectors as the embeddings), else the embeddings of the shards holding them."""
    from curation.embed.pool_reader import read_pool
    from curation.ingest.ids import bytes_to_hex
    from curation.select.layout import (
        LAYOUT_TABLE,
        bucket_names,
        layout_clusters_per_bucket,
        layout_dataset,
        layout_dtype,
        read_bucket,
    )

    if db.exists(LAYOUT_TABLE) and layout_dtype(db) == "float32":
        cs = np.asarray(sorted(set(int(c) for c in clusters)), dtype=np.int32)
        buckets = bucket_names(cs, layout_clusters_per_bucket(db)).to_list()
        ds = layout_dataset(db)
        ids, xs = [], []
        for b in sorted(set(buckets)):
            rows = read_bucket(db, b, clusters=[int(c) for c, bb in zip(cs, buckets) if bb == b], dtype="float32", dataset=ds)
            ids.append(bytes_to_hex(rows.uids).astype(str))
            xs.append(rows.x)
        if ids and sum(len(i) for i in ids) == uids.len():
            return np.concatenate(ids).tolist(), np.concatenate(xs)
        log.warning("views: the layout holds other members than assignments for clusters %s; reading the embeddings", cs.tolist())
    shards = sorted(db.read_uids("assignments", uids, ["shard"])["shard"].unique().to_list())
    pe = read_pool(db, shards=shards, columns=("image",))
    return pe.uids.tolist(), pe.image


def dedup_groups(
    db: Lake,
    landing: str | os.PathLike,
    eps: float = DEFAULT_EPS,
    n_groups: int = 6,
    per_group: int = 5,
    size: int = 64,
    max_cluster: int = 4096,
) -> dict:
    """Duplicate groups SemDeDup removes at ``eps``, largest first.

    Reads ``dedup_scores`` (cluster and M only, to find the clusters with the most removals),
    then the image vectors of at most 8 such clusters of at most ``max_cluster`` members (the
    group structure is recomputed there: the table stores only ``M``): from the
    ``pool_by_cluster`` layout when it holds float32 vectors (those clusters' row groups
    only), else from the embeddings of the shards holding them. A cluster has members in
    nearly every shard, so at 10M the shard read loaded the whole pool (killed at 24 GB).

    Returns:
        ``{"eps", "n", "removed", "curve": [(eps, fraction)], "groups": [{"cluster_id",
        "kept": sample, "removed": [sample + "cos"]}]}``.
    """
    if not db.exists("dedup_scores"):
        return {"eps": eps, "n": 0, "removed": 0, "curve": [], "groups": []}
    ds = db.read("dedup_scores", columns=["cluster_id", "max_sim_to_earlier"])
    m = ds["max_sim_to_earlier"].to_numpy()
    dup = is_duplicate(m, eps)
    out = {"eps": eps, "n": int(m.size), "removed": int(dup.sum()), "curve": removed_fraction_curve(m), "groups": []}
    if not dup.any():
        return out
    sizes = ds.group_by("cluster_id").len().rename({"len": "members"})
    per_cluster = (
        ds.with_columns(pl.Series("dup", dup)).group_by("cluster_id").agg(pl.col("dup").sum().alias("removed"))
        .join(sizes, on="cluster_id").filter((pl.col("removed") > 0) & (pl.col("members") <= max_cluster))
        .sort(["removed", "cluster_id"], descending=[True, False]).head(8)
    )
    chosen = per_cluster["cluster_id"].to_list()
    if not chosen:
        return out
    del ds
    asg = db.read_where("assignments", ["uid", "cluster_id", "cos_to_centroid"], pl.col("cluster_id").is_in(chosen))
    vec_uids, image = _cluster_vectors(db, chosen, asg["uid"])
    row_of = {u: i for i, u in enumerate(vec_uids)}
    asg = asg.filter(pl.col("uid").is_in(list(row_of)))
    uids = asg["uid"].to_numpy().astype(str)
    groups: list[tuple[int, int, str, list[tuple[str, float]]]] = []  # (size, cluster, kept uid, removed)
    for members in cluster_member_groups(len(uids), asg["cluster_id"].to_numpy(), asg["cos_to_centroid"].to_numpy(), uids, min_size=2):
        cid = int(asg["cluster_id"][int(members[0])])
        mu = uids[members]
        x = image[[row_of[u] for u in mu]]
        for k, rem in duplicate_groups_in_cluster(x, eps):
            rem = sorted(rem, key=lambda t: -t[1])
            groups.append((len(rem), cid, str(mu[k]), [(str(mu[j]), c) for j, c in rem]))
    groups.sort(key=lambda g: (-g[0], g[1], g[2]))
    groups = groups[:n_groups]
    wanted = [g[2] for g in groups] + [u for g in groups for u, _ in g[3][:per_group]]
    info = attach_thumbnails(db, landing, wanted, size=size, max_count=max(1, len(wanted)))
    shown = [u for g in groups for u, _ in g[3][:per_group]]
    ms = dict(db.read_where("dedup_scores", ["uid", "max_sim_to_earlier"], pl.col("uid").is_in(shown)).iter_rows())
    for n_rem, cid, kept, rem in groups:
        out["groups"].append(
            {
                "cluster_id": cid,
                "n_removed": n_rem,
                "kept": info.get(kept, {"uid": kept, "caption": "", "thumb": None}),
                "removed": [{**info.get(u, {"uid": u, "caption": "", "thumb": None}), "cos": c, "m": ms.get(u)} for u, c in rem[:per_group]],
            }
        )
    return out


# --------------------------------------------------------------------------- recipes


def removal_reasons(db: Lake, recipe: str, rec: Recipe | None, removed_uids: Sequence[str]) -> dict[str, str]:
    """Why each removed uid was removed by ``recipe``: ``dedup`` (with M and eps) or the
    recipe's own pruning step. Reads the ``dedup_scores`` rows of those uids only (streamed)."""
    eps = recipe_eps(rec)
    reasons = {u: f"pruned by {rec.method if rec else recipe}" for u in removed_uids}
    if eps is not None and db.exists("dedup_scores") and removed_uids:
        ds = db.read_uids("dedup_scores", list(removed_uids), ["max_sim_to_earlier"])
        for u, m in ds.iter_rows():
            if m > 1.0 - eps:
                reasons[u] = f"SemDeDup duplicate: M={m:.3f} > 1-eps={1 - eps:.3f}"
    return reasons


def _uids_at(ds, positions: np.ndarray) -> list[str]:
    """The ``uid`` of the rows at ``positions`` of a pyarrow dataset, in that order."""
    if not len(positions):
        return []
    return [str(u) for u in ds.take(np.asarray(positions, np.int64), columns=["uid"]).column("uid").to_pylist()]


def _pick_removed(db: Lake, recipe: str, n_pool: int, n_removed: int, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` uniformly drawn uids of the pool (``assignments``) that ``recipe`` did not keep,
    without reading the pool's uids: rows are drawn by position (seeded), the kept ones among
    them found by a filtered scan of the recipe's ``subsets`` uids, and the draw grows until
    enough removed rows came up (all rows at worst: then exact)."""
    want = min(n, n_removed)
    if want <= 0:
        return []
    pool = db.dataset("assignments")
    order = rng.permutation(n_pool)  # one permutation: a larger draw extends the smaller one
    draw = min(n_pool, 3 * want * n_pool // n_removed + 32)
    while True:
        cand = _uids_at(pool, order[:draw])
        kept = set(db.scan("subsets").filter((pl.col("recipe") == recipe) & pl.col("uid").is_in(cand))
                   .select("uid").collect(engine="streaming")["uid"].to_list())
        removed = [u for u in cand if u not in kept]
        if len(removed) >= want or draw == n_pool:
            return removed[:want]
        draw = min(n_pool, 2 * draw)


def kept_removed(
    db: Lake, landing: str | os.PathLike, recipes: Sequence[str] | None = None, n: int = 6, size: int = 64, seed: int = 0
) -> list[dict]:
    """Per recipe, ``n`` seeded random kept and ``n`` removed samples (with the reason).

    Bounded by ``n``, not by the pool: counts come from Parquet footers, kept samples are rows
    of the recipe's ``subsets`` partition drawn by position, removed ones pool rows drawn by
    position whose uid the recipe did not keep (:func:`_pick_removed`); the same seed and
    tables give the same samples.

    Returns:
        ``[{"recipe", "method", "n_pool", "n_kept", "kept": [sample], "removed": [sample + "reason"]}]``.
    """
    known = _recipes_in_lake(db)
    names = [r for r in (recipes or list(known)) if r in known]
    if not names or not db.exists("assignments"):
        return []
    n_pool = db.count_rows("assignments")
    picks: list[tuple[str, list[str], list[str], int]] = []
    for name in names:
        sub = db.dataset("subsets", file_pruning_predicate=[("recipe", "=", name)])
        n_kept = sub.count_rows()
        rng = np.random.default_rng([seed, len(name)])
        k = _uids_at(sub, np.sort(rng.choice(n_kept, size=min(n, n_kept), replace=False))) if n_kept else []
        r = _pick_removed(db, name, n_pool, n_pool - n_kept, n, rng)
        picks.append((name, k, r, n_kept))
    info = attach_thumbnails(db, landing, [u for _, k, r, _ in picks for u in k + r], size=size, max_count=2000)
    out = []
    for name, k, r, n_kept in picks:
        rec = known.get(name)
        why = removal_reasons(db, name, rec, r)
        out.append(
            {
                "recipe": name,
                "method": rec.method if rec else "",
                "n_pool": int(n_pool),
                "n_kept": int(n_kept),
                "kept": [info.get(u, {"uid": u, "caption": "", "thumb": None}) for u in k],
                "removed": [{**info.get(u, {"uid": u, "caption": "", "thumb": None}), "reason": why[u]} for u in r],
            }
        )
    return out


def waterfall(db: Lake) -> list[dict]:
    """What each stage removed, per recipe: keys seen -> quarantine -> dedup -> pruning -> kept.

    Returns:
        ``[{"recipe", "seen", "quarantine", "dedup", "pruning", "kept", "eps"}]`` (counts;
        ``dedup`` is 0 for recipes without a SemDeDup step).
    """
    known = _recipes_in_lake(db)
    n_samples = db.count_rows("samples") if db.exists("samples") else 0
    n_quar = db.count_rows("quarantine") if db.exists("quarantine") else 0
    n_embed_q = 0
    if db.exists("quarantine"):
        n_embed_q = db.read("quarantine", columns=["stage"]).filter(pl.col("stage") == "embed").height
    n_ingest_q = n_quar - n_embed_q
    n_pool = db.count_rows("assignments") if db.exists("assignments") else 0
    m = None
    if db.exists("dedup_scores"):
        m = db.read("dedup_scores", columns=["max_sim_to_earlier"])["max_sim_to_earlier"].to_numpy()
    kept_of = db.partition_counts("subsets") if known else {}
    out = []
    for name, rec in known.items():
        eps = recipe_eps(rec)
        dedup = int(is_duplicate(m, eps).sum()) if (eps is not None and m is not None) else 0
        n_kept = int(kept_of.get(name, 0))
        out.append(
            {
                "recipe": name,
                "seen": n_samples + n_ingest_q,
                "quarantine": n_quar,
                "dedup": dedup,
                "pruning": int(n_pool) - dedup - n_kept,
                "kept": n_kept,
                "eps": eps,
            }
        )
    return out


# --------------------------------------------------------------------------- quarantine


def quarantine_examples(
    db: Lake, landing: str | os.PathLike, per_reason: int = 3, size: int = 64, shard: str | None = None
) -> list[dict]:
    """Every quarantine ``(stage, reason)`` with its count and up to ``per_reason`` examples
    (thumbnail where the bytes decode, else ``None``; the detail says why); one ``shard`` only
    when given.

    Returns:
        ``[{"stage", "reason", "count", "examples": [{"shard", "key", "detail", "thumb"}]}]``,
        most frequent first.
    """
    if not db.exists("quarantine"):
        return []
    q = db.read("quarantine", columns=["shard", "key", "stage", "reason", "detail"], partitions=[shard] if shard else None)
    if q.height == 0:
        return []
    counts = q.group_by("stage", "reason").len().sort(["len", "reason"], descending=[True, False])
    ex = q.sort(["shard", "key"]).group_by("stage", "reason", maintain_order=True).head(per_reason)
    thumbs = load_key_thumbnails(landing, [(r["shard"], r["key"]) for r in ex.iter_rows(named=True)], size=size, max_count=2000)
    out = []
    for st, reason, cnt in counts.iter_rows():
        rows = ex.filter((pl.col("stage") == st) & (pl.col("reason") == reason))
        out.append(
            {
                "stage": st,
                "reason": reason,
                "count": int(cnt),
                "examples": [{**r, "thumb": thumbs.get((r["shard"], r["key"]))} for r in rows.select("shard", "key", "detail").iter_rows(named=True)],
            }
        )
    return out
