"""Evaluate-stage assets: eval reports per recipe and the side-by-side curation report.

* ``eval_reports[recipe]``: :func:`curation.evaluate.evaluator.evaluate` of every checkpoint of the
  recipe on the held-out splits under ``DatasetsResource.eval_root`` -> ``eval_results``.
* ``curation_report``: :func:`curation.evaluate.report.build_comparison` + ``write_report`` over all
  recipes -> ``artifacts/reports/`` (HTML, markdown, PNG plots).
"""


import json
import logging
import time

import dagster as dg
import numpy as np
import polars as pl

from assets import previews
from assets.metadata import md_table
from assets.partitions import recipe_partitions
from curation.storage.lake import Lake
from resources import ComputeResource, DatasetsResource, LakeResource
from assets.train import GROUP


log = logging.getLogger(__name__)


ALL_RECIPES = dg.AllPartitionMapping()


class EvalReportsConfig(dg.Config):
    """Which tasks (empty: every task of every split under the eval root) and the prompt
    templates for eval sets that ship none (``simple``: generic ImageNet-style; a set's own
    ``templates`` in tasks.json or zeroshot_classification_templates.txt always win)."""

    tasks: list[str] = []
    templates: str = "simple"


@dg.asset(
    partitions_def=recipe_partitions,
    deps=[dg.AssetDep("trained_checkpoints")],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="Zero-shot classification and image<->text retrieval of every checkpoint of the recipe on "
    "the held-out eval splits: the `eval_results` partition (task, metric, value per seed).",
)
def eval_reports(
    context: dg.AssetExecutionContext,
    config: EvalReportsConfig,
    lake: LakeResource,
    datasets: DatasetsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from curation.embed.encoders import build_encoder
    from curation.evaluate.evaluator import (
        AVERAGE_TASK,
        EvalTask,
        evaluate,
        main_metric,
        results_to_rows,
        template_set,
    )

    template_set(config.templates)  # validate before any work
    recipe = context.partition_key
    db = lake.lake()
    cks = db.read("checkpoints", partitions=[recipe]) if db.exists("checkpoints") else pl.DataFrame()
    if cks.height == 0:
        raise ValueError(f"recipe {recipe!r}: got no rows in `checkpoints`; expected trained_checkpoints materialized")
    t0 = time.perf_counter()
    rows = []
    per_seed = []
    for ck in cks.iter_rows(named=True):
        seed = int(json.loads(ck["config_json"]).get("seed", 0))
        enc = build_encoder("open_clip", compute.spec(), model_name=ck["model"], pretrained=ck["path"])
        res = evaluate(enc, datasets.eval_root, config.tasks or None, templates=config.templates)
        per_seed.append((seed, res))
        for r in results_to_rows(res):
            rows.append({"recipe": recipe, "checkpoint": ck["path"], **r, "seed": seed})
    frame = pl.DataFrame(rows, schema={"recipe": pl.String, "checkpoint": pl.String, "task": pl.String,
                                       "metric": pl.String, "value": pl.Float64, "seed": pl.Int64})  # fmt: skip
    db.write("eval_results", frame, partition=recipe)
    summary = []
    for seed, res in per_seed:
        for task, m in res.items():
            key = "main" if task == AVERAGE_TASK else main_metric(EvalTask.parse(task).kind)
            summary.append({"seed": seed, "task": task, "metric": key, "value": float(m[key])})
    avg = [float(res[AVERAGE_TASK]["main"]) for _, res in per_seed]
    return dg.MaterializeResult(
        metadata=previews.rounded({
            "recipe": recipe,
            "checkpoints": len(per_seed),
            "tasks": int(per_seed[0][1][AVERAGE_TASK]["tasks"]),
            "average": float(np.mean(avg)),
            "average_std": float(np.std(avg)),
            "rows": frame.height,
            "seconds": round(time.perf_counter() - t0, 2),
            "results": dg.MetadataValue.md(md_table(pl.DataFrame(summary), max_rows=None, max_chars=70, float_fmt=".4f")),
        })
    )


def subset_sizes(db: Lake) -> tuple[dict[str, int], int | None]:
    """``({recipe: kept}, pool size)`` from the ``subsets`` and ``samples`` tables."""
    kept: dict[str, int] = {}
    if db.exists("subsets"):
        counts = db.read("subsets", columns=["recipe", "uid"]).group_by("recipe").len()
        kept = dict(zip(counts["recipe"].to_list(), counts["len"].to_list()))
    pool = db.read("embeddings", columns=["uid"]).height if db.exists("embeddings") else None
    return kept, pool


@dg.asset(
    deps=[dg.AssetDep("eval_reports", partition_mapping=ALL_RECIPES)],
    group_name=GROUP,
    kinds={"html", "markdown"},
    description="Every recipe side by side at matched compute: samples kept, kept fraction, samples seen, "
    "training time, each task's metric and their mean, difference from `full` and from `random` of the "
    "same size. HTML + markdown + PNG plots under artifacts/reports/.",
)
def curation_report(context: dg.AssetExecutionContext, lake: LakeResource, datasets: DatasetsResource) -> dg.MaterializeResult:
    from curation.evaluate.report import build_comparison, write_report

    db = lake.lake()
    if not db.exists("eval_results"):
        raise ValueError("curation_report: got no `eval_results` table; expected eval_reports materialized")
    ev = db.read("eval_results")
    cks = db.read("checkpoints") if db.exists("checkpoints") else pl.DataFrame()
    ev = ev.join(cks.select(pl.col("path").alias("checkpoint")), on="checkpoint", how="semi") if cks.height else ev
    kept, pool = subset_sizes(db)
    comparison = build_comparison(ev, cks, kept, pool_size=pool)
    expected = list(recipe_partitions.get_partition_keys())
    missing = sorted(set(expected) - set(comparison["recipe"].to_list()))
    notes = [
        f"pool: {pool} samples; recipes: {comparison.height}" + (f" (not evaluated yet: {', '.join(missing)})" if missing else ""),
        "metrics: zero-shot mean per-class recall per label task (chance = 1 / classes), mean of "
        "image->text and text->image recall@1, and their average (DataComp style); all recipes train "
        "for the same number of samples seen.",
        "Δ random compares with the random recipe of the nearest size (named in parentheses).",
    ]
    out = write_report(comparison, lake.artifacts("reports"), notes=notes)
    best = comparison.sort("average", descending=True, nulls_last=True).row(0, named=True) if "average" in comparison.columns else None
    meta = {
        "recipes": comparison.height,
        "missing_recipes": dg.MetadataValue.json(missing),
        "report_html": dg.MetadataValue.path(str(out["html"])),
        "report_markdown": dg.MetadataValue.path(str(out["markdown"])),
        "plots": dg.MetadataValue.json([str(p) for p in out["plots"]]),
        "markdown": dg.MetadataValue.md(out["markdown_text"]),
        **previews.report_plots(out["plots"]), **previews.waterfall(lake), **previews.explorer(lake, datasets),
    }
    if best is not None:
        meta["best_recipe"] = best["recipe"]
        meta["best_average"] = float(best["average"])
    return dg.MaterializeResult(metadata=previews.rounded(meta))

ASSETS = [eval_reports, curation_report]
