"""Pool-wide curation assets: concept clusters, SemDeDup scores, complexity, pruned subsets.

Thin adapters over ``curation``:

* ``concept_clusters`` (all shards' ``embeddings``): :func:`curation.select.clustering.train_centroids`
  + :func:`~curation.select.clustering.assign` (mode ``retrain``), or only
  :func:`~curation.select.clustering.assign_new` for uids not assigned yet (mode ``assign``; ``auto``
  retrains only when no centroids exist or ``k`` changed) -> tables ``clusters`` and
  ``assignments``. A new shard never forces re-clustering.
* ``dedup_scores``: :func:`curation.select.semdedup.semdedup_scores_distributed` (in process unless Ray is configured) -> table ``dedup_scores``.
* ``complexity_scores``: :func:`curation.select.clustering.cluster_complexity` -> the ``d_intra``,
  ``d_inter``, ``complexity``, ``weight`` columns of ``clusters``.
* ``pruned_subsets[recipe]``: :func:`curation.select.recipes.apply_recipe` -> the recipe's
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
import pyarrow as pa

from assets.metadata import md_table
from assets.partitions import recipe_partitions
from curation.select.clustering import (
    DEFAULT_MAX_POINTS_PER_CENTROID,
    DEFAULT_NEIGHBORS,
    DEFAULT_NITER,
    DEFAULT_TAU,
    Complexity,
    assign,
    assign_new,
    cluster_complexity,
    default_k,
    train_centroids,
    use_gpu,
)
from curation.select.semdedup import EPS_GRID, removed_fraction
from curation.select.export import export_subset
from curation.storage.lake import Lake, list_column_to_matrix, matrix_to_list_column
from curation.embed.pool_reader import read_pool
from curation.select.recipes import Pool, apply_recipe, get_recipe, recipe_hash
from curation.select.semdedup import semdedup_scores_distributed
from resources import ComputeResource, DatasetsResource, LakeResource
from resources.distributed import DistributedResource

GROUP = "curation"
ALIGNED_ENCODER_PREFIX = "openclip:"
ALL_SHARDS = dg.AllPartitionMapping()


# --------------------------------------------------------------------------- table IO helpers


def clusters_frame(centroids: np.ndarray, comp: Complexity) -> pa.Table:
    """The ``clusters`` table rows (schema in docs/architecture.md)."""
    k = centroids.shape[0]
    return pa.table(
        {
            "cluster_id": pa.array(np.arange(k, dtype=np.int32)),
            "centroid": matrix_to_list_column(centroids),
            "size": pa.array(comp.size.astype(np.int64)),
            "d_intra": pa.array(comp.d_intra.astype(np.float64)),
            "d_inter": pa.array(comp.d_inter.astype(np.float64)),
            "complexity": pa.array(comp.complexity.astype(np.float64)),
            "weight": pa.array(comp.weight.astype(np.float64)),
        }
    )


def read_centroids(db: Lake) -> np.ndarray:
    """(k, d) float32 centroids of the ``clusters`` table, row ``j`` = cluster ``j``."""
    df = db.read("clusters", columns=["cluster_id", "centroid"]).sort("cluster_id")
    if not np.array_equal(df["cluster_id"].to_numpy(), np.arange(df.height)):
        raise ValueError("clusters table: got cluster ids that are not 0..k-1; expected a dense range")
    return list_column_to_matrix(df["centroid"])


def read_assigned_pool(db: Lake, with_embeddings: bool) -> dict:
    """Pool rows that have an assignment, aligned: uids, shards, cluster_ids, cos, (x).

    Rows of ``embeddings`` without an assignment yet (shards that arrived after the last
    ``concept_clusters`` run) are left out and counted in ``n_unassigned``.
    """
    asg = db.read("assignments", columns=["uid", "shard", "cluster_id", "cos_to_centroid"])
    out: dict = {"centroids": read_centroids(db)}
    if with_embeddings:
        pe = read_pool(db, columns=("image",))
        idx = (
            pl.DataFrame({"uid": pl.Series(pe.uids, dtype=pl.String)})
            .with_row_index("row")
            .join(asg, on="uid", how="inner", maintain_order="left")
        )
        rows = idx["row"].to_numpy()
        out["x"] = pe.image if rows.size == len(pe.uids) and np.array_equal(rows, np.arange(rows.size)) else pe.image[rows]
        out["n_unassigned"] = len(pe.uids) - rows.size
        asg = idx.drop("row")
    else:
        out["n_unassigned"] = 0
    out["uids"] = asg["uid"].to_numpy().astype(str)
    out["shards"] = asg["shard"].to_numpy().astype(str)
    out["cluster_ids"] = asg["cluster_id"].to_numpy().astype(np.int32)
    out["cos"] = asg["cos_to_centroid"].to_numpy().astype(np.float32)
    return out


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
    """Spherical k-means settings. ``k`` None: keep the existing k, or ``default_k(N)`` when
    there are no centroids yet. ``mode``: ``auto`` retrains only when no centroids exist or
    ``k`` changed, else assigns only new uids; ``retrain`` always re-runs k-means; ``assign``
    never does (fails without centroids)."""

    k: Optional[int] = None
    niter: int = DEFAULT_NITER
    seed: int = 0
    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID
    mode: Literal["auto", "retrain", "assign"] = "auto"


@dg.asset(
    deps=[dg.AssetDep("embeddings", partition_mapping=ALL_SHARDS)],
    group_name=GROUP,
    kinds={"faiss", "delta"},
    description="Concept clusters of the pool: spherical k-means centroids (`clusters`) and each "
    "sample's cluster and cos_to_centroid (`assignments`). New shards are assigned to the existing "
    "centroids without retraining (mode auto).",
)
def concept_clusters(context: dg.AssetExecutionContext, config: ConceptClustersConfig, lake: LakeResource) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    db = lake.lake()
    pe = read_pool(db, columns=("image",))
    n = len(pe.uids)
    if n == 0:
        raise ValueError("embeddings table: got no rows; expected embedded samples (materialize embeddings first)")
    have = db.exists("clusters") and db.exists("assignments")
    old_k = db.table("clusters").to_pyarrow_dataset().count_rows() if have else None
    k = config.k if config.k is not None else (old_k or default_k(n))
    if config.mode == "assign" and not have:
        raise ValueError("mode: got 'assign' but no centroids exist; expected 'auto' or 'retrain' first")
    retrain = config.mode == "retrain" or (config.mode == "auto" and (not have or k != old_k))
    if retrain:
        cent = train_centroids(pe.image, k, niter=config.niter, seed=config.seed,
                               max_points_per_centroid=config.max_points_per_centroid)
        ids, cos = assign(pe.image, cent)
        n_new = n
    else:
        cent = read_centroids(db)
        old = db.read("assignments", columns=["uid", "cluster_id", "cos_to_centroid"])
        cur = pl.DataFrame({"uid": pl.Series(pe.uids, dtype=pl.String)}).with_row_index("row")
        kept = cur.join(old, on="uid", how="inner")
        new_idx, new_ids, new_cos = assign_new(pe.uids, pe.image, cent, kept["uid"])
        ids = np.empty(n, np.int32)
        cos = np.empty(n, np.float32)
        rows = kept["row"].to_numpy()
        ids[rows] = kept["cluster_id"].to_numpy()
        cos[rows] = kept["cos_to_centroid"].to_numpy()
        ids[new_idx], cos[new_idx] = new_ids, new_cos
        n_new = int(new_idx.size)
        k = cent.shape[0]
    comp = cluster_complexity(ids, cos, cent)
    db.write("clusters", clusters_frame(cent, comp))
    db.write(
        "assignments",
        pl.DataFrame(
            {
                "uid": pl.Series(pe.uids, dtype=pl.String),
                "shard": pl.Series(pe.shards, dtype=pl.String),
                "cluster_id": pl.Series(ids, dtype=pl.Int32),
                "cos_to_centroid": pl.Series(cos, dtype=pl.Float32),
            }
        ),
    )
    seconds = time.perf_counter() - t0
    context.log.info("concept_clusters: %s, k=%d, n=%d, newly assigned %d", "retrained" if retrain else "assigned", k, n, n_new)
    return dg.MaterializeResult(
        metadata={
            "mode": "retrain" if retrain else "assign",
            "k": k,
            "rows": n,
            "newly_assigned": n_new,
            "encoder": pe.encoder or "",
            "seed": config.seed,
            "niter": config.niter,
            "gpu": use_gpu(),
            "empty_clusters": int((comp.size == 0).sum()),
            "mean_cos_to_centroid": float(cos.mean()),
            "seconds": round(seconds, 3),
            "throughput_per_s": round(n / seconds, 1) if seconds > 0 else 0.0,
            "cluster_size_histogram": dg.MetadataValue.md(size_histogram(comp.size)),
        }
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
    context: dg.AssetExecutionContext, lake: LakeResource, distributed: DistributedResource, compute: ComputeResource
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    db = lake.lake()
    p = read_assigned_pool(db, with_embeddings=True)
    # in process by default; per-cluster work on Ray when the resource names an address
    # (identical scores: tests/test_distributed.py); Ray starts lazily
    with distributed.executor(compute.spec()) as ex:
        m = semdedup_scores_distributed(ex, p["x"], p["cluster_ids"], p["cos"], p["uids"])
    db.write(
        "dedup_scores",
        pl.DataFrame(
            {
                "uid": pl.Series(p["uids"], dtype=pl.String),
                "cluster_id": pl.Series(p["cluster_ids"], dtype=pl.Int32),
                "max_sim_to_earlier": pl.Series(m, dtype=pl.Float32),
            }
        ),
    )
    fr = removed_fraction(m, EPS_GRID)
    seconds = time.perf_counter() - t0
    grid = pl.DataFrame({"eps": list(fr), "removed_fraction": list(fr.values()),
                         "removed": [int(round(v * len(m))) for v in fr.values()]})
    return dg.MaterializeResult(
        metadata={
            "rows": len(m),
            "unassigned_skipped": p["n_unassigned"],
            **{f"removed_fraction@eps={e}": v for e, v in fr.items()},
            "removed_by_eps": dg.MetadataValue.md(md_table(grid)),
            "seconds": round(seconds, 3),
            "throughput_per_s": round(len(m) / seconds, 1) if seconds > 0 else 0.0,
        }
    )


# --------------------------------------------------------------------------- complexity_scores


class ComplexityConfig(dg.Config):
    """DBP complexity: softmax temperature ``tau`` and ``l = min(n_neighbors, k - 1)``."""

    tau: float = DEFAULT_TAU
    n_neighbors: int = DEFAULT_NEIGHBORS
    examples: int = 3


def _examples(db: Lake, asg: pl.DataFrame, clusters: list[int], per: int) -> dict[int, str]:
    """Captions of the ``per`` most prototypical members of each listed cluster."""
    if not db.exists("samples") or not clusters:
        return {}
    top = (
        asg.filter(pl.col("cluster_id").is_in(clusters))
        .sort(["cluster_id", "cos_to_centroid"], descending=[False, True])
        .group_by("cluster_id", maintain_order=True)
        .head(per)
    )
    caps = db.read("samples", columns=["uid", "caption"]).join(top.select("uid", "cluster_id"), on="uid")
    return {int(c): " / ".join(g["caption"].to_list()) for (c,), g in caps.group_by(["cluster_id"])}


@dg.asset(
    deps=[concept_clusters, dg.AssetDep("samples", partition_mapping=ALL_SHARDS)],
    group_name=GROUP,
    kinds={"numpy", "delta"},
    description="DBP complexity of every concept cluster: d_intra, d_inter (l nearest other "
    "centroids), complexity = d_intra * d_inter and weight = softmax(complexity / tau), written to "
    "the `clusters` table.",
)
def complexity_scores(context: dg.AssetExecutionContext, config: ComplexityConfig, lake: LakeResource) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    db = lake.lake()
    cent = read_centroids(db)
    asg = db.read("assignments", columns=["uid", "cluster_id", "cos_to_centroid"])
    comp = cluster_complexity(asg["cluster_id"].to_numpy(), asg["cos_to_centroid"].to_numpy(), cent,
                              n_neighbors=config.n_neighbors, tau=config.tau)
    db.write("clusters", clusters_frame(cent, comp))
    table = pl.DataFrame(
        {"cluster_id": np.arange(cent.shape[0]), "size": comp.size, "d_intra": comp.d_intra,
         "d_inter": comp.d_inter, "complexity": comp.complexity, "weight": comp.weight}
    ).sort("complexity", descending=True)
    most, least = table.head(5), table.tail(5).reverse()
    ex = _examples(db, asg, most["cluster_id"].to_list() + least["cluster_id"].to_list(), config.examples)

    def with_ex(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.col("cluster_id").map_elements(lambda c: ex.get(c, ""), return_dtype=pl.String).alias("examples"))

    return dg.MaterializeResult(
        metadata={
            "k": int(cent.shape[0]),
            "tau": config.tau,
            "n_neighbors": comp.n_neighbors,
            "complexity_min": float(comp.complexity.min()),
            "complexity_max": float(comp.complexity.max()),
            "weight_max": float(comp.weight.max()),
            "most_complex": dg.MetadataValue.md(md_table(with_ex(most), max_chars=120)),
            "least_complex": dg.MetadataValue.md(md_table(with_ex(least), max_chars=120)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )


# --------------------------------------------------------------------------- pruned_subsets


class PrunedSubsetsConfig(dg.Config):
    """Export settings: kept samples per webdataset shard; skip the shards (uids + manifest only)."""

    shard_size: int = 10_000
    write_shards: bool = True


def read_aligned(db: Lake, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """ALIGNED image/caption embeddings for ``uids`` (in that order) and where they came from.

    ``filter_embeddings`` (the filter_model's CLIP) when it exists, else ``embeddings`` when
    its encoder is a CLIP (``openclip:...``).

    Raises:
        ValueError: no aligned source, or some uids have no aligned embeddings.
    """
    want = pl.DataFrame({"uid": pl.Series(uids, dtype=pl.String)}).with_row_index("row")
    if db.exists("filter_embeddings"):
        fe = db.read("filter_embeddings", columns=["uid", "image_emb", "text_emb", "model"])
        j = want.join(fe, on="uid", how="left", maintain_order="left")
        missing = j.filter(pl.col("image_emb").is_null()).height
        if missing:
            raise ValueError(f"filter_embeddings: got no rows for {missing} of {len(uids)} pool uids; expected every pool sample (re-materialize filter_model)")
        models = j["model"].unique().to_list()
        return list_column_to_matrix(j["image_emb"]), list_column_to_matrix(j["text_emb"]), f"filter_embeddings:{','.join(models)}"
    pe = read_pool(db, columns=("image", "text"))
    if not (pe.encoder or "").startswith(ALIGNED_ENCODER_PREFIX):
        raise ValueError(
            f"aligned embeddings: got no filter_embeddings table and embeddings encoder {pe.encoder!r}; "
            f"expected filter_model to be materialized or an '{ALIGNED_ENCODER_PREFIX}' embeddings encoder"
        )
    j = want.join(pl.DataFrame({"uid": pl.Series(pe.uids, dtype=pl.String)}).with_row_index("src"), on="uid", how="left", maintain_order="left")
    if j["src"].null_count():
        raise ValueError(f"embeddings: got no rows for {j['src'].null_count()} assigned uids; expected all")
    src = j["src"].to_numpy()
    return pe.image[src], pe.text[src], f"embeddings:{pe.encoder}"


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
    recipe = get_recipe(context.partition_key)
    db = lake.lake()
    p = read_assigned_pool(db, with_embeddings=False)
    max_sim = None
    if recipe.needs_dedup:
        if not db.exists("dedup_scores"):
            raise ValueError(f"recipe {recipe.name!r} needs SemDeDup scores: got no dedup_scores table; expected it materialized")
        ds = db.read("dedup_scores", columns=["uid", "max_sim_to_earlier"])
        j = pl.DataFrame({"uid": pl.Series(p["uids"], dtype=pl.String)}).join(ds, on="uid", how="left", maintain_order="left")
        if j["max_sim_to_earlier"].null_count():
            raise ValueError(f"dedup_scores: got no score for {j['max_sim_to_earlier'].null_count()} assigned uids; expected all (re-materialize dedup_scores)")
        max_sim = j["max_sim_to_earlier"].to_numpy().astype(np.float32)
    img = txt = None
    aligned_source = ""
    if recipe.needs_aligned:
        img, txt, aligned_source = read_aligned(db, p["uids"])
    pool = Pool(uids=p["uids"], cluster_ids=p["cluster_ids"], cos_to_centroid=p["cos"], centroids=p["centroids"],
                max_sim=max_sim, image_aligned=img, text_aligned=txt)
    with distributed.executor(compute.spec()) as ex:  # per-class CLIPCov on Ray when configured
        sel = apply_recipe(recipe, pool, executor=ex)
    frame = sel.to_frame()
    db.write("subsets", frame, partition=recipe.name)
    select_s = time.perf_counter() - t0

    samples = db.read("samples", columns=["uid", "dataset", "shard", "key", "caption", "member", "image_sha256"])
    kept_samples = samples.join(frame.select("uid"), on="uid", how="semi")
    extra = {"recipe_hash": recipe_hash(recipe), "aligned_source": aligned_source,
             **{k: v for k, v in sel.stats.items() if k not in ("budgets", "sizes")}}
    out_dir = lake.artifacts("subsets", recipe.name)
    exp = export_subset(out_dir, frame, kept_samples, datasets.landing, recipe=recipe.to_dict(), extra=extra,
                        shard_size=config.shard_size, write_shards=config.write_shards)
    seconds = time.perf_counter() - t0
    preview = (
        frame.head(10).join(samples.select("uid", "caption"), on="uid", how="left").sort("rank").select("rank", "uid", "score", "caption")
    )
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
    if aligned_source:
        meta["aligned_source"] = aligned_source
    if "budgets" in sel.stats:
        b, s = sel.stats["budgets"], sel.stats["sizes"]
        nz = s > 0
        frac = b[nz] / s[nz]
        meta.update({"cluster_keep_fraction_min": float(frac.min()) if frac.size else 0.0,
                     "cluster_keep_fraction_max": float(frac.max()) if frac.size else 0.0,
                     "clusters_with_budget": int((b > 0).sum())})
    return dg.MaterializeResult(metadata=meta)


ASSETS = [concept_clusters, dedup_scores, complexity_scores, pruned_subsets]
