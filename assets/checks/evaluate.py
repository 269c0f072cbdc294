"""Checks of the evaluate stage, one property each (the per-recipe ones partitioned like their asset).

Partitioned asset checks are a preview feature of Dagster 1.13 (``partitions_def`` on
``@asset_check``); the preview warning is silenced in ``assets/checks/__init__.py``.
"""


import math

import dagster as dg
import numpy as np
import polars as pl

from assets.evaluate import curation_report, eval_reports
from assets.partitions import recipe_partitions
from resources import LakeResource
from assets.checks.train import _partition


# metrics that are counts, not rates in [0, 1]
COUNT_METRICS = ("n_classes", "n_samples", "n_texts", "tasks")


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
    eval_metrics_in_unit_interval,
    report_covers_evaluated_recipes,
]
