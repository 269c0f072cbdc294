"""Checks of the model stage, one property each (the per-recipe ones partitioned like their asset).

Partitioned asset checks are a preview feature of Dagster 1.13 (``partitions_def`` on
``@asset_check``); the preview warning is silenced here, where it is known and intended.
"""


import math
import warnings

import dagster as dg
import numpy as np
import polars as pl

from assets.models import curation_report, eval_reports, filter_model, trained_checkpoints
from assets.partitions import recipe_partitions
from curation.lake import list_column_to_matrix
from resources import LakeResource

warnings.filterwarnings(
    "ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning
)

# metrics that are counts, not rates in [0, 1]
COUNT_METRICS = ("n_classes", "n_samples", "n_texts", "tasks")


def _partition(lake: LakeResource, table: str, key: str) -> pl.DataFrame:
    db = lake.lake()
    return db.read(table, partitions=[key]) if db.exists(table) else pl.DataFrame()


@dg.asset_check(
    asset=trained_checkpoints,
    partitions_def=recipe_partitions,
    blocking=True,
    description="Every checkpoint of the recipe loads (torch.load weights_only=True, strict keys) and all "
    "its weights are finite.",
)
def checkpoints_load_with_finite_weights(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    from curation.training import load_checkpoint

    rows = _partition(lake, "checkpoints", context.partition_key)
    bad: list[str] = []
    n_params = 0
    for path in rows["path"].to_list() if rows.height else []:
        try:
            model, _ = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - the failure is the observed value
            bad.append(f"{path}: {type(e).__name__}: {e}"[:300])
            continue
        for name, t in model.state_dict().items():
            n_params += t.numel()
            if t.is_floating_point() and not bool(t.isfinite().all()):
                bad.append(f"{path}: {name} has non-finite values")
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
    description="Compute is matched: this recipe's checkpoints saw the same number of samples as every "
    "other recipe's in the `checkpoints` table.",
)
def samples_seen_matched(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    db = lake.lake()
    allrows = db.read("checkpoints", columns=["recipe", "samples_seen"]) if db.exists("checkpoints") else pl.DataFrame()
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
    asset=eval_reports,
    partitions_def=recipe_partitions,
    blocking=True,
    description="Every rate metric (accuracy, per-class recall, recall@k, average) of the recipe is finite "
    "and within [0, 1], and every checkpoint has an average.",
)
def eval_metrics_in_unit_interval(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    rows = _partition(lake, "eval_results", context.partition_key)
    rates = rows.filter(~pl.col("metric").is_in(COUNT_METRICS)) if rows.height else rows
    vals = rates["value"].to_numpy() if rates.height else np.zeros(0)
    bad = rates.filter(~(pl.col("value").is_finite() & pl.col("value").is_between(0.0, 1.0))) if rates.height else rates
    n_ck = rows["checkpoint"].n_unique() if rows.height else 0
    n_avg = rows.filter(pl.col("task") == "average")["checkpoint"].n_unique() if rows.height else 0
    return dg.AssetCheckResult(
        passed=rates.height > 0 and bad.height == 0 and n_avg == n_ck,
        metadata={
            "rate_values": rates.height,
            "observed_min": float(vals.min()) if vals.size else math.nan,
            "observed_max": float(vals.max()) if vals.size else math.nan,
            "out_of_range": bad.height,
            "checkpoints_with_average": f"{n_avg}/{n_ck}",
            "threshold": "all rates finite and in [0, 1]",
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


@dg.asset_check(
    asset=curation_report,
    description="The report holds every recipe that has eval results (one row each).",
)
def report_covers_evaluated_recipes(lake: LakeResource) -> dg.AssetCheckResult:
    from pathlib import Path

    db = lake.lake()
    evaluated = set(db.read("eval_results", columns=["recipe"])["recipe"].to_list()) if db.exists("eval_results") else set()
    table = Path(lake.artifacts_root) / "reports" / "comparison.parquet"
    reported = pl.read_parquet(table)["recipe"].to_list() if table.exists() else []
    missing = sorted(evaluated - set(reported))
    return dg.AssetCheckResult(
        passed=bool(reported) and not missing and len(reported) == len(set(reported)),
        metadata={
            "observed_recipes": len(reported),
            "evaluated_recipes": len(evaluated),
            "missing": dg.MetadataValue.json(missing),
            "threshold": "every evaluated recipe exactly once",
        },
    )


CHECKS = [
    checkpoints_load_with_finite_weights,
    samples_seen_matched,
    eval_metrics_in_unit_interval,
    filter_embeddings_valid,
    report_covers_evaluated_recipes,
]
