"""Checks on the pool-wide curation assets, one property each (observed value vs threshold).

* ``budgets_sum_to_n_keep`` (pruned_subsets, blocking): the subset has exactly the ``N_keep``
  its recipe asks for, recomputed independently from the pool tables.
* ``kept_uids_in_samples`` (pruned_subsets, blocking): every kept uid is a ``samples`` row.
* ``no_heldout_samples`` (pruned_subsets, blocking): no held-out evaluation sample (by uid or
  image_sha256, from ``eval/*/manifest.parquet``) is in the subset.
* ``cluster_tables_no_nan``: no NaN in concept_clusters' ``centroids`` and ``assignments``, or
  in complexity_scores' ``clusters``.
"""


from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from assets.partitions import recipe_partitions
from assets.select import complexity_scores, concept_clusters, pruned_subsets
from curation.select.pool_tables import read_centroids
from curation.select.semdedup import is_duplicate
from curation.storage.lake import Lake, list_column_to_matrix
from curation.select.controls import control_size, control_targets, is_control
from curation.select.recipes import Pool, expected_keep, get_recipe
from resources import DatasetsResource, LakeResource


def _subset(db: Lake, recipe: str) -> pl.DataFrame:
    if not db.exists("subsets"):
        return pl.DataFrame({"uid": pl.Series([], dtype=pl.String)})
    return db.read("subsets", columns=["uid"], partitions=[recipe])


@dg.asset_check(asset=pruned_subsets, partitions_def=recipe_partitions, blocking=True,
                description="The subset holds exactly the N_keep samples its recipe asks for.")
def budgets_sum_to_n_keep(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    return budget_result(lake.lake(), context.partition_key)


def budget_result(db: Lake, recipe_name: str) -> dg.AssetCheckResult:
    """Subset size of ``recipe_name`` vs the N_keep recomputed from assignments and dedup_scores."""
    if is_control(recipe_name):
        return control_budget_result(db, recipe_name)
    recipe = get_recipe(recipe_name)
    observed = _subset(db, recipe.name).height
    n_pool = db.count_rows("assignments")
    eps = recipe.eps if recipe.method == "semdedup" else recipe.after_semdedup_eps
    if eps is None:
        n_cand = n_pool
    else:
        m = db.read("dedup_scores", columns=["max_sim_to_earlier"])["max_sim_to_earlier"].to_numpy()
        n_cand = int((~is_duplicate(m, eps)).sum())
    expected = expected_keep(recipe, n_cand)
    meta = {"observed": observed, "n_pool": n_pool, "n_candidates": n_cand}
    if expected is None:  # threshold recipe: no budget, only an upper bound
        return dg.AssetCheckResult(passed=observed <= n_cand, metadata={**meta, "threshold": f"<= {n_cand} (threshold recipe)"})
    return dg.AssetCheckResult(passed=observed == expected, metadata={**meta, "threshold": f"== {expected}"})


def control_budget_result(db: Lake, name: str) -> dg.AssetCheckResult:
    """A size-matched control holds exactly as many samples as its target recipe keeps."""
    observed = _subset(db, name).height
    a = db.read("assignments", columns=["uid"])
    m = None
    if db.exists("dedup_scores"):
        ds = db.read("dedup_scores", columns=["uid", "max_sim_to_earlier"])
        m = a.join(ds, on="uid", how="left", maintain_order="left")["max_sim_to_earlier"].fill_null(0.0).to_numpy().astype(np.float32)
    n = a.height
    pool = Pool(uids=a["uid"].to_numpy(), cluster_ids=np.zeros(n, np.int32), cos_to_centroid=np.zeros(n, np.float32),
                centroids=np.zeros((1, 1), np.float32), max_sim=m)  # fmt: skip
    expected = control_size(name, pool, subset_size=lambda r: _subset(db, r).height)
    meta = {"observed": observed, "n_pool": n, "targets": ", ".join(control_targets(name)), "threshold": f"== {expected}"}
    return dg.AssetCheckResult(passed=observed == expected, metadata=meta)


@dg.asset_check(asset=pruned_subsets, partitions_def=recipe_partitions, blocking=True,
                description="Every kept uid exists in the samples table.")
def kept_uids_in_samples(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    db = lake.lake()
    sub = _subset(db, context.partition_key)
    samples = db.read("samples", columns=["uid"])
    missing = sub.join(samples, on="uid", how="anti")
    return dg.AssetCheckResult(
        passed=missing.height == 0,
        metadata={"observed_missing": missing.height, "threshold": "== 0", "kept": sub.height,
                  "examples": ", ".join(missing["uid"].head(5).to_list())},
    )


def heldout_manifest(eval_root: str) -> pl.DataFrame:
    """uid and image_sha256 of every held-out sample (``eval/*/manifest.parquet``)."""
    frames = [pl.read_parquet(p, columns=["uid", "image_sha256"]) for p in sorted(Path(eval_root).glob("*/manifest.parquet"))]
    if not frames:
        return pl.DataFrame({"uid": pl.Series([], dtype=pl.String), "image_sha256": pl.Series([], dtype=pl.String)})
    return pl.concat(frames)


@dg.asset_check(asset=pruned_subsets, partitions_def=recipe_partitions, blocking=True,
                description="No held-out evaluation sample (by uid or image_sha256) is in the subset.")
def no_heldout_samples(context: dg.AssetCheckExecutionContext, lake: LakeResource, datasets: DatasetsResource) -> dg.AssetCheckResult:
    db = lake.lake()
    sub = _subset(db, context.partition_key)
    held = heldout_manifest(datasets.eval_root)
    kept = sub.join(db.read("samples", columns=["uid", "image_sha256"]), on="uid", how="left")
    by_uid = kept.join(held.select("uid"), on="uid", how="semi")
    by_hash = kept.filter(pl.col("image_sha256").is_not_null()).join(held.select("image_sha256").unique(), on="image_sha256", how="semi")
    leaked = pl.concat([by_uid["uid"], by_hash["uid"]]).unique()
    return dg.AssetCheckResult(
        passed=leaked.len() == 0,
        metadata={"observed_overlap": leaked.len(), "by_uid": by_uid.height, "by_image_sha256": by_hash.height,
                  "threshold": "== 0", "heldout_samples": held.height, "eval_root": datasets.eval_root,
                  "examples": ", ".join(leaked.head(5).to_list())},
    )


def _nan_counts(db: Lake, table: str) -> dict[str, int]:
    """NaN rows of concept_clusters' tables (``centroids`` + ``assignments``) or of ``clusters``."""
    if table == "centroids":
        cent = read_centroids(db)
        cos = db.read("assignments", columns=["cos_to_centroid"])["cos_to_centroid"]
        return {"centroids.centroid": int(np.isnan(cent).any(axis=1).sum()),
                "assignments.cos_to_centroid": int(cos.is_nan().sum() + cos.null_count())}
    cl = db.read("clusters")
    counts = {"clusters.centroid": int(np.isnan(list_column_to_matrix(cl["centroid"])).any(axis=1).sum())}
    for col in ("d_intra", "d_inter", "complexity", "weight"):
        counts[f"clusters.{col}"] = int(cl[col].is_nan().sum() + cl[col].null_count())
    return counts


def _no_nan(lake: LakeResource, table: str) -> dg.AssetCheckResult:
    counts = _nan_counts(lake.lake(), table)
    total = sum(counts.values())
    return dg.AssetCheckResult(passed=total == 0, metadata={"observed_nan_rows": total, "threshold": "== 0", **counts})


@dg.asset_check(asset=concept_clusters, name="cluster_tables_no_nan",
                description="No NaN in the centroids and assignments tables.")
def concept_clusters_no_nan(lake: LakeResource) -> dg.AssetCheckResult:
    return _no_nan(lake, "centroids")


@dg.asset_check(asset=complexity_scores, name="cluster_tables_no_nan",
                description="No NaN in the clusters table (complexity_scores' output).")
def complexity_scores_no_nan(lake: LakeResource) -> dg.AssetCheckResult:
    return _no_nan(lake, "clusters")


SUBSET_CHECKS = [budgets_sum_to_n_keep, kept_uids_in_samples, no_heldout_samples]
CLUSTER_CHECKS = [concept_clusters_no_nan, complexity_scores_no_nan]
CHECKS = [*SUBSET_CHECKS, *CLUSTER_CHECKS]
