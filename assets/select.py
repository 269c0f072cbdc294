"""Pool-wide curation assets: concept clusters, SemDeDup scores, complexity, pruned subsets.

Thin adapters over ``curation``:

* ``concept_clusters`` (all shards' ``embeddings``): :func:`curation.select.layout.fit_centroids`
  (k-means on a bounded sample) + :func:`~curation.select.layout.build_layout` (streaming
  assignment, the ``pool_by_cluster`` bucket layout) in mode ``retrain``, or
  :func:`~curation.select.layout.update_layout` (only new or changed shards) in mode ``assign``;
  ``auto`` retrains only when no centroids exist or ``k`` changed -> tables ``centroids``,
  ``assignments``, ``pool_by_cluster`` (their one writer). A new shard never forces re-clustering.
* ``dedup_scores``: :func:`curation.select.layout.dedup_scores_by_bucket` (one bucket per task,
  in process unless Ray is configured; only touched clusters recompute) -> ``dedup_scores``.
* ``complexity_scores``: :func:`curation.select.clustering.cluster_complexity` -> the ``clusters``
  table (its one writer): centroid, size, ``d_intra``, ``d_inter``, ``complexity``, ``weight``,
  ``n_neighbors``, ``tau``. pruned_subsets' DBP reads the stored ``d_inter`` (so this edge carries
  data) and recomputes only ``d_intra`` on the post-SemDeDup candidates, as the DBP paper prunes
  the deduplicated pool.
* ``pruned_subsets[recipe]``: :func:`curation.select.pool_tables.read_recipe_pool` (what the
  recipe needs; DBP reuses complexity_scores' ``d_inter``) + :func:`curation.select.recipes.apply_recipe` -> the recipe's
  ``subsets`` partition, plus :func:`curation.select.export.export_subset` under
  ``artifacts/subsets/<recipe>/``. clipscore/clipcov read ALIGNED image/caption embeddings
  from ``filter_embeddings`` (written by ``filter_model``), or from ``embeddings`` itself when
  its encoder is a CLIP (id starting with ``openclip:``).
"""


import time
from typing import Literal, Optional

import dagster as dg
import numpy as np
import polars as pl

from assets import previews
from assets.metadata import md_table
from assets.partitions import recipe_partitions
from curation.select.clustering import (
    DEFAULT_MAX_POINTS_PER_CENTROID,
    DEFAULT_NEIGHBORS,
    DEFAULT_NITER,
    DEFAULT_TAU,
    cluster_complexity,
    default_k,
    use_gpu,
)
from curation.select.export import export_subset, kept_in_pool_order
from curation.select.layout import (
    DEFAULT_CLUSTERS_PER_BUCKET,
    DEFAULT_MEMORY_BUDGET,
    LayoutConfig,
    build_layout,
    compact_layout,
    dedup_scores_by_bucket,
    fit_centroids,
    layout_files_per_bucket,
    layout_state,
    update_layout,
    write_dedup_scores,
)
from curation.select.pool_tables import (
    ALIGNED_ENCODER_PREFIX,
    aligned_source,
    centroids_frame,
    clusters_frame,
    read_centroids,
    read_kept_samples,
    read_recipe_pool,
    store_selection,
    stored_d_inter,
)
from curation.select.controls import finalize_control, needs_dedup_scores, resolve_recipe
from curation.select.recipes import apply_recipe, recipe_hash
from curation.select.semdedup import EPS_GRID, removed_fraction
from curation.storage.lake import Lake
from resources import ComputeResource, DatasetsResource, LakeResource
from resources.distributed import DistributedResource

GROUP = "curation"
ALL_SHARDS = dg.AllPartitionMapping()


# --------------------------------------------------------------------------- helpers


def size_histogram(sizes: np.ndarray) -> str:
    """Markdown histogram of cluster sizes over power-of-two bins."""
    sizes = np.asarray(sizes)
    if sizes.size == 0:
        return "_no clusters_"
    edges = [0, 1]
    while edges[-1] <= sizes.max():
        edges.append(edges[-1] * 2)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        cnt = int(((sizes >= lo) & (sizes < hi)).sum())
        if cnt:
            label = str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
            rows.append({"size": label, "clusters": cnt, "bar": "#" * max(1, round(40 * cnt / sizes.size))})
    return md_table(pl.DataFrame(rows), max_rows=64)


# --------------------------------------------------------------------------- concept_clusters


class ConceptClustersConfig(dg.Config):
    """Spherical k-means settings and the cluster layout. ``k`` None: keep the existing k, or
    ``default_k(N)`` when there are no centroids yet. ``mode``: ``auto`` retrains only when no
    centroids exist or ``k`` changed, else assigns only new or changed shards (incremental);
    ``retrain`` always re-runs k-means; ``assign`` never does (fails without centroids).
    ``method``: ``flat`` (exact), ``two-level`` (sub-linear in k) or ``auto`` (flat up to
    k = 2048). ``nprobe``: cells the two-level assignment scans (None: ``max(8, sqrt(k) // 8)``;
    more is slower and closer to exact, ``round(sqrt(k))`` is exact). ``target_recall``: instead,
    the fewest cells whose recall against the exact search reaches this fraction on 4,096 rows of
    up to 8 shards spread over the streamed ones. Either way the metadata reports the recall
    measured on 32 other rows of every shard (``assign_recall``). ``layout_dtype``: vector type of ``pool_by_cluster`` (float32 or
    float16). ``compact_min_files``: after writing the layout, compact every bucket holding at
    least this many data files into one file sorted by cluster (Delta OPTIMIZE ZORDER BY
    cluster_id, :func:`curation.select.layout.compact_layout`); None: never. A build writes one
    file per bucket (``layout_spill``) and each update appends one per touched bucket; compacted, a few
    clusters' update reads less (1M: 406 -> 165 MiB, 0.28 -> 0.14 s for 24 clusters; 10M: a
    topical shard's SemDeDup 21.3 -> 5.95 GB, 31.7 -> 10.7 s) at the cost of one rewrite of
    those buckets (3.4 s for the whole 1M layout, 68 s for 10M) and, until a vacuum, their disk.
    ``layout_spill``: a build holds the layout's rows per bucket in temporary files under
    ``TMPDIR`` (the layout's size) and writes each bucket once in cluster order; False: every
    flush is appended (a file per bucket per flush, no temporary space)."""

    k: Optional[int] = None
    niter: int = DEFAULT_NITER
    seed: int = 0
    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID
    mode: Literal["auto", "retrain", "assign"] = "auto"
    method: Literal["auto", "flat", "two-level"] = "auto"
    nprobe: Optional[int] = None
    target_recall: Optional[float] = None
    clusters_per_bucket: int = DEFAULT_CLUSTERS_PER_BUCKET
    layout_dtype: Literal["float32", "float16"] = "float32"
    compact_min_files: Optional[int] = None
    layout_spill: bool = True


@dg.asset(
    deps=[dg.AssetDep("embeddings", partition_mapping=ALL_SHARDS)],
    group_name=GROUP,
    kinds={"faiss", "delta"},
    description="Concept clusters of the pool: spherical k-means centroids trained on a bounded sample "
    "(`centroids`), each sample's cluster and cos_to_centroid (`assignments`) and the vectors laid out by "
    "cluster bucket (`pool_by_cluster`), written by streaming the shard partitions once. New or changed "
    "shards are assigned to the existing centroids without retraining (mode auto).",
)
def concept_clusters(context: dg.AssetExecutionContext, config: ConceptClustersConfig, lake: LakeResource) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    db = lake.lake()
    if not db.exists("embeddings") or db.count_rows("embeddings") == 0:
        raise ValueError("embeddings table: got no rows; expected embedded samples (materialize embeddings first)")
    encoder = db.dataset("embeddings").head(1, columns=["encoder"]).column(0)[0].as_py()
    # an aligned (CLIP) encoder: the layout also carries caption vectors for CLIPCov / CLIP score
    layout_cfg = LayoutConfig(clusters_per_bucket=config.clusters_per_bucket, dtype=config.layout_dtype,
                              with_text=str(encoder).startswith(ALIGNED_ENCODER_PREFIX), nprobe=config.nprobe,
                              target_recall=config.target_recall, spill=config.layout_spill)
    have = (db.exists("centroids") or db.exists("clusters")) and db.exists("assignments")
    old_k = read_centroids(db).shape[0] if have else None
    if config.mode == "assign" and not have:
        raise ValueError("mode: got 'assign' but no centroids exist; expected 'auto' or 'retrain' first")
    n_pool = db.count_rows("embeddings")
    k = config.k if config.k is not None else (old_k or default_k(n_pool))
    retrain = config.mode == "retrain" or (config.mode == "auto" and (not have or k != old_k))
    if retrain:
        cent, _ = fit_centroids(db, k, niter=config.niter, seed=config.seed,
                                max_points_per_centroid=config.max_points_per_centroid, method=config.method)
        up = build_layout(db, cent, layout_cfg, assign_method=config.method)
    else:
        cent = read_centroids(db)
        state = layout_state(db)
        old_cfg = ((set(state["clusters_per_bucket"].to_list()), set(state["dtype"].to_list()),
                    set(state["with_text"].to_list()) if "with_text" in state.columns else {False})
                   if state is not None else None)
        if old_cfg is not None and old_cfg != ({layout_cfg.clusters_per_bucket}, {layout_cfg.dtype}, {layout_cfg.with_text}):
            up = build_layout(db, cent, layout_cfg, assign_method=config.method)  # layout settings changed
        else:
            up = update_layout(db, cent, layout_cfg, assign_method=config.method)
        k = cent.shape[0]
    db.write("centroids", centroids_frame(cent))
    compacted = compact_layout(db, config.compact_min_files) if config.compact_min_files is not None else None
    asg = db.read("assignments", columns=["cluster_id"])
    sizes = np.bincount(asg["cluster_id"].to_numpy(), minlength=cent.shape[0])
    seconds = time.perf_counter() - t0
    n = up.n_rows
    context.log.info("concept_clusters: %s, k=%d, n=%d, newly assigned %d", "retrained" if retrain else up.mode, k, n, up.n_new)
    return dg.MaterializeResult(
        metadata=previews.rounded({
            "mode": "retrain" if retrain else "assign",
            "layout_update": up.mode,
            "k": k,
            "rows": n,
            "newly_assigned": up.n_new,
            "shards_streamed": len(up.added_shards),
            "shards_removed": len(up.removed_shards),
            "touched_clusters": int(len(up.touched_clusters)),
            "layout_dtype": layout_cfg.dtype,
            "clusters_per_bucket": layout_cfg.clusters_per_bucket,
            "encoder": up.encoders[0] if len(up.encoders) == 1 else "",
            "seed": config.seed,
            "niter": config.niter,
            "method": config.method,
            "gpu": use_gpu(),
            "empty_clusters": int((sizes == 0).sum()),
            "seconds": round(seconds, 3),
            "throughput_per_s": round(up.n_new / seconds, 1) if seconds > 0 else 0.0,
            "cluster_size_histogram": dg.MetadataValue.md(size_histogram(sizes)),
            **(up.assignment.metadata() if up.assignment is not None else {}),
            "layout_files": compacted.layout_files if compacted is not None else sum(layout_files_per_bucket(db).values()),
            **({"buckets_compacted": len(compacted.buckets), "compact_seconds": round(compacted.seconds, 3)}
               if compacted is not None else {}),
        })
    )


# --------------------------------------------------------------------------- dedup_scores


@dg.asset(
    deps=[concept_clusters],
    group_name=GROUP,
    kinds={"numpy", "delta"},
    description="SemDeDup: for each sample the max cosine to an earlier (less prototypical) member "
    "of its cluster (`dedup_scores.max_sim_to_earlier`); any eps is then a filter M > 1 - eps.",
)
def dedup_scores(
    context: dg.AssetExecutionContext, lake: LakeResource, distributed: DistributedResource, compute: ComputeResource,
    datasets: DatasetsResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    db = lake.lake()
    # one bucket per task, each task reads its bucket from the lake (in process unless Ray is
    # configured; identical scores: tests/test_distributed.py); only touched clusters recompute
    with distributed.executor(compute.spec()) as ex:
        du = dedup_scores_by_bucket(db, ex, LayoutConfig(memory_budget_bytes=DEFAULT_MEMORY_BUDGET))
    write_dedup_scores(db, du)
    m = du.max_sim
    fr = removed_fraction(m, EPS_GRID)
    seconds = time.perf_counter() - t0
    grid = pl.DataFrame({"eps": list(fr), "removed_fraction": list(fr.values()),
                         "removed": [int(round(v * len(m))) for v in fr.values()]})
    return dg.MaterializeResult(
        metadata=previews.rounded({
            "rows": len(m),
            "update": du.mode,
            "clusters_recomputed": du.recomputed_clusters,
            "clusters_updated_exactly": du.updated_clusters,
            "rows_scored": du.rows_scored,
            "rows_reentered": du.reentered,
            # changed or removed shards: the share of rows in touched clusters (>= 0.8: a full pass)
            **({"touched_share_of_rows": du.touched_share} if du.touched_share is not None else {}),
            **{f"removed_fraction@eps={e}": v for e, v in fr.items()},
            "removed_by_eps": dg.MetadataValue.md(md_table(grid)),
            **previews.dedup_preview(lake, datasets),
            "seconds": round(seconds, 3),
            "seconds_scoring_clusters": round(du.score_seconds, 3),
            "throughput_per_s": round(du.rows_scored / seconds, 1) if seconds > 0 else 0.0,
        })
    )


# --------------------------------------------------------------------------- complexity_scores


class ComplexityConfig(dg.Config):
    """DBP complexity: softmax temperature ``tau`` and ``l = min(n_neighbors, k - 1)``."""

    tau: float = DEFAULT_TAU
    n_neighbors: int = DEFAULT_NEIGHBORS
    examples: int = 3


def _examples(db: Lake, clusters: list[int], per: int) -> dict[int, str]:
    """Captions of the ``per`` most prototypical members of each listed cluster (their
    assignments rows streamed: memory holds those clusters' rows, not the pool's)."""
    if not db.exists("samples") or not clusters:
        return {}
    top = (
        db.read_where("assignments", ["uid", "cluster_id", "cos_to_centroid"], pl.col("cluster_id").is_in(clusters))
        .sort(["cluster_id", "cos_to_centroid"], descending=[False, True])
        .group_by("cluster_id", maintain_order=True)
        .head(per)
    )
    caps = read_kept_samples(db, top["uid"], ["caption"]).join(top.select("uid", "cluster_id"), on="uid")
    return {int(c): " / ".join(g["caption"].to_list()) for (c,), g in caps.group_by(["cluster_id"])}


@dg.asset(
    deps=[concept_clusters, dg.AssetDep("samples", partition_mapping=ALL_SHARDS)],
    group_name=GROUP,
    kinds={"numpy", "delta"},
    description="DBP complexity of every concept cluster: d_intra, d_inter (l nearest other "
    "centroids), complexity = d_intra * d_inter and weight = softmax(complexity / tau), written to "
    "the `clusters` table.",
)
def complexity_scores(context: dg.AssetExecutionContext, config: ComplexityConfig, lake: LakeResource, datasets: DatasetsResource) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    db = lake.lake()
    cent = read_centroids(db)
    # the numbers only (no uid strings: 10M of them are ~0.6 GB); d_inter depends only on the
    # centroids: an incremental update (same centroids) reuses the stored one
    asg = db.dataset("assignments").to_table(columns=["cluster_id", "cos_to_centroid"])
    d_inter = stored_d_inter(db, cent, config.n_neighbors)
    comp = cluster_complexity(asg.column("cluster_id").to_numpy(), asg.column("cos_to_centroid").to_numpy(), cent,
                              n_neighbors=config.n_neighbors, tau=config.tau, d_inter=d_inter)
    del asg
    db.write("clusters", clusters_frame(cent, comp))
    table = pl.DataFrame(
        {"cluster_id": np.arange(cent.shape[0]), "size": comp.size, "d_intra": comp.d_intra,
         "d_inter": comp.d_inter, "complexity": comp.complexity, "weight": comp.weight}
    ).sort("complexity", descending=True)
    most, least = table.head(5), table.tail(5).reverse()
    ex = _examples(db, most["cluster_id"].to_list() + least["cluster_id"].to_list(), config.examples)

    def with_ex(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.col("cluster_id").map_elements(lambda c: ex.get(c, ""), return_dtype=pl.String).alias("examples"))

    return dg.MaterializeResult(
        metadata=previews.rounded({
            "k": int(cent.shape[0]),
            "tau": config.tau,
            "n_neighbors": comp.n_neighbors,
            "d_inter": "stored (same centroids)" if d_inter is not None else "computed",
            "complexity_min": float(comp.complexity.min()),
            "complexity_max": float(comp.complexity.max()),
            "weight_max": float(comp.weight.max()),
            "most_complex": dg.MetadataValue.md(md_table(with_ex(most), max_chars=120)),
            "least_complex": dg.MetadataValue.md(md_table(with_ex(least), max_chars=120)),
            **previews.cluster_gallery(lake, datasets),
            "seconds": round(time.perf_counter() - t0, 3),
        })
    )


# --------------------------------------------------------------------------- pruned_subsets


class PrunedSubsetsConfig(dg.Config):
    """Export settings: kept samples per webdataset shard; skip the shards (uids + manifest only)."""

    shard_size: int = 10_000
    write_shards: bool = True


@dg.asset(
    partitions_def=recipe_partitions,
    deps=[
        dg.AssetDep("samples", partition_mapping=ALL_SHARDS),
        concept_clusters,
        complexity_scores,
        dedup_scores,
        dg.AssetDep("filter_model"),
    ],
    group_name=GROUP,
    kinds={"numpy", "delta", "webdataset"},
    description="The subset a recipe keeps (`subsets` partition: uid, rank, score) and its exports "
    "under artifacts/subsets/<recipe>/: sorted DataComp uid .npy, parquet manifest, webdataset "
    "shards of the kept samples, recipe.json.",
)
def pruned_subsets(
    context: dg.AssetExecutionContext,
    config: PrunedSubsetsConfig,
    lake: LakeResource,
    datasets: DatasetsResource,
    distributed: DistributedResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    recipe = resolve_recipe(context.partition_key)  # a declared recipe or a derived control
    db = lake.lake()
    # what the recipe needs (a control also reads what its target's chain needs); DBP reuses
    # complexity_scores' d_inter
    pool = read_recipe_pool(db, recipe, needs_dedup=needs_dedup_scores(context.partition_key))
    aligned = aligned_source(db) if recipe.needs_aligned else ""
    recipe = finalize_control(recipe, pool, subset_size=lambda name: db.count_rows("subsets", name))
    with distributed.executor(compute.spec()) as ex:  # per-class CLIPCov on Ray when configured
        sel = apply_recipe(recipe, pool, executor=ex)
    select_s = time.perf_counter() - t0
    # the kept uids in the pool's (uid) order, for the uid file; the other pool arrays are not
    # needed for the export
    kept_uids = kept_in_pool_order(pool.uids, sel.index)
    del pool
    # the subsets rows are written while the kept samples rows are read: only those rows, streamed,
    # in rank order (the image hashes only when shards are written and checked)
    frame, kept = store_selection(db, recipe.name, sel.to_arrow(),
                                  ["uid", "dataset", "shard", "key", "caption", "member"]
                                  + (["image_sha256"] if config.write_shards else []))
    # the top ranks' captions from those rows (no second scan of samples), copied out of them
    top = pl.DataFrame(kept.head(10).select("uid", "caption").to_dicts(), schema={"uid": pl.String, "caption": pl.String})
    preview = frame.head(10).join(top, on="uid", how="left").sort("rank").select("rank", "uid", "score", "caption")
    extra = {"recipe_hash": recipe_hash(recipe), "aligned_source": aligned,
             **{k: v for k, v in sel.stats.items() if k not in ("budgets", "sizes")}}
    out_dir = lake.artifacts("subsets", recipe.name)
    # the export holds the only reference to the kept rows, so it frees them once its manifest is built
    held = [kept]
    del kept
    exp = export_subset(out_dir, frame, held.pop(), datasets.landing, recipe=recipe.to_dict(), extra=extra,
                        shard_size=config.shard_size, write_shards=config.write_shards, kept_uids=kept_uids)
    seconds = time.perf_counter() - t0
    meta = {
        "recipe": recipe.name,
        "method": recipe.method,
        "recipe_hash": recipe_hash(recipe),
        "seed": recipe.seed,
        "n_pool": sel.stats["n_pool"],
        "n_candidates": sel.stats["n_candidates"],
        "n_keep": sel.stats["n_keep"] if sel.stats["n_keep"] is not None else -1,
        "kept": sel.stats["n_kept"],
        "kept_fraction": sel.stats["n_kept"] / max(1, sel.stats["n_pool"]),
        "export_dir": dg.MetadataValue.path(str(out_dir)),
        "export_shards": exp["n_shards"],
        "export_missing": exp["n_missing"],
        "export_bytes": exp["bytes"],
        "select_seconds": round(select_s, 3),
        "seconds": round(seconds, 3),
        "preview": dg.MetadataValue.md(md_table(preview)),
    }
    meta.update({**previews.kept_removed(lake, datasets, recipe.name), **previews.cluster_gallery(lake, datasets, [recipe.name])})
    if aligned:
        meta["aligned_source"] = aligned
    if "budgets" in sel.stats:
        b, s = sel.stats["budgets"], sel.stats["sizes"]
        nz = s > 0
        frac = b[nz] / s[nz]
        meta.update({"cluster_keep_fraction_min": float(frac.min()) if frac.size else 0.0,
                     "cluster_keep_fraction_max": float(frac.max()) if frac.size else 0.0,
                     "clusters_with_budget": int((b > 0).sum())})
    return dg.MaterializeResult(metadata=previews.rounded(meta))


ASSETS = [concept_clusters, dedup_scores, complexity_scores, pruned_subsets]
