"""Checks of the train stage, one property each (the per-recipe ones partitioned like their asset).

Partitioned asset checks are a preview feature of Dagster 1.13 (``partitions_def`` on
``@asset_check``); the preview warning is silenced in ``assets/checks/__init__.py``.
"""



import dagster as dg

from assets.settings import filter_model_needed
import numpy as np
import polars as pl

from assets.train import filter_model, trained_checkpoints
from assets.partitions import recipe_partitions
from curation.storage.lake import list_column_to_matrix
from resources import LakeResource


def _partition(lake: LakeResource, table: str, key: str) -> pl.DataFrame:
    db = lake.lake()
    return db.read(table, partitions=[key]) if db.exists(table) else pl.DataFrame()


@dg.asset_check(
    asset=trained_checkpoints,
    partitions_def=recipe_partitions,
    blocking=True,
    description="Every checkpoint of the recipe loads with the one loader (open_clip model, torch.load "
    "weights_only=True, strict keys; path relative to the artifacts root) and all its weights are finite.",
)
def checkpoints_load_with_finite_weights(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    from curation.embed.model_registry import load_checkpoint
    from curation.train.checkpoints import resolve_artifact_path

    rows = _partition(lake, "checkpoints", context.partition_key)
    bad: list[str] = []
    n_params = 0
    for rel, name in zip(rows["path"].to_list(), rows["model"].to_list()) if rows.height else []:
        path = resolve_artifact_path(rel, lake.artifacts_root)
        try:
            model, _, _, _ = load_checkpoint(path, name)
        except Exception as e:  # noqa: BLE001 - the failure is the observed value
            bad.append(f"{path}: {type(e).__name__}: {e}"[:300])
            continue
        for key, t in model.state_dict().items():
            n_params += t.numel()
            if t.is_floating_point() and not bool(t.isfinite().all()):
                bad.append(f"{path}: {key} has non-finite values")
    return dg.AssetCheckResult(
        passed=rows.height > 0 and not bad,
        metadata={
            "checkpoints": rows.height,
            "observed_failures": len(bad),
            "threshold": ">= 1 checkpoint, 0 load failures, 0 non-finite tensors",
            "parameters_checked": n_params,
            "failures": dg.MetadataValue.json(bad[:10]),
        },
    )


@dg.asset_check(
    asset=trained_checkpoints,
    partitions_def=recipe_partitions,
    description="Compute is matched: this recipe's main-budget checkpoints saw the same number of samples as "
    "every other recipe's in the `checkpoints` table (compute-curve runs excluded).",
)
def samples_seen_matched(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    db = lake.lake()
    allrows = db.read("checkpoints", columns=["recipe", "samples_seen", "main_budget"]) if db.exists("checkpoints") else pl.DataFrame()
    if allrows.height:  # compute-curve runs (main_budget false) are extra budgets, not the matched one
        from curation.evaluate.report import main_budget_checkpoints

        allrows = main_budget_checkpoints(allrows).select("recipe", "samples_seen")
    mine = allrows.filter(pl.col("recipe") == context.partition_key) if allrows.height else allrows
    values = sorted(set(allrows["samples_seen"].to_list())) if allrows.height else []
    per_recipe = (
        allrows.group_by("recipe").agg(pl.col("samples_seen").unique().sort()).sort("recipe") if allrows.height else allrows
    )
    return dg.AssetCheckResult(
        passed=mine.height > 0 and len(values) == 1,
        metadata={
            "observed_samples_seen": dg.MetadataValue.json(sorted(set(mine["samples_seen"].to_list())) if mine.height else []),
            "distinct_values_across_recipes": dg.MetadataValue.json(values),
            "threshold": "exactly 1 distinct samples_seen across all recipes",
            "per_recipe": dg.MetadataValue.json(
                {r: v for r, v in zip(per_recipe["recipe"].to_list(), per_recipe["samples_seen"].to_list())} if per_recipe.height else {}
            ),
        },
    )


@dg.asset_check(
    asset=filter_model,
    blocking=True,
    description="`filter_embeddings` covers the pool once per uid with finite unit-norm vectors, and "
    "clip_score equals cos(image_emb, text_emb) within 1e-4.",
)
def filter_embeddings_valid(lake: LakeResource) -> dg.AssetCheckResult:
    db = lake.lake()
    fe = db.read("filter_embeddings") if db.exists("filter_embeddings") else pl.DataFrame()
    pool = db.read("embeddings", columns=["uid"]) if db.exists("embeddings") else pl.DataFrame({"uid": []})
    if not filter_model_needed()[0]:
        return dg.AssetCheckResult(passed=True, metadata={"skipped": filter_model_needed()[1]})
    if fe.height == 0:
        return dg.AssetCheckResult(passed=False, metadata={"rows": 0, "threshold": "one row per pool uid"})
    img, txt = list_column_to_matrix(fe["image_emb"]), list_column_to_matrix(fe["text_emb"])
    finite = bool(np.isfinite(img).all() and np.isfinite(txt).all())
    norm_err = float(max(np.abs(np.linalg.norm(img, axis=1) - 1).max(), np.abs(np.linalg.norm(txt, axis=1) - 1).max()))
    score_err = float(np.abs(np.einsum("nd,nd->n", img, txt) - fe["clip_score"].to_numpy()).max())
    dup = fe.height - fe["uid"].n_unique()
    missing = pool.join(fe.select("uid"), on="uid", how="anti").unique().height
    return dg.AssetCheckResult(
        passed=finite and norm_err < 1e-3 and score_err < 1e-4 and dup == 0 and missing == 0,
        metadata={
            "rows": fe.height,
            "observed_max_norm_error": norm_err,
            "observed_max_clip_score_error": score_err,
            "duplicate_uids": dup,
            "pool_uids_missing": missing,
            "finite": finite,
            "threshold": "finite, | |v| - 1 | < 1e-3, score error < 1e-4, 0 duplicates, 0 missing",
        },
    )


CHECKS = [
    checkpoints_load_with_finite_weights,
    samples_seen_matched,
    filter_embeddings_valid,
]
