"""Evaluate-stage assets: eval reports per recipe and the side-by-side curation report.

* ``eval_reports[recipe]``: every checkpoint of the recipe on the declared eval sets through
  clip_benchmark (:func:`curation.evaluate.benchmark.evaluate_checkpoint`; sets written in its
  webdataset layout, its result JSON under ``artifacts/eval/<recipe>/``) -> ``eval_results``.
* ``curation_report``: :func:`curation.evaluate.report.build_comparison` + ``write_report`` over all
  recipes -> ``artifacts/reports/`` (HTML, markdown, PNG plots).
"""


import logging
import time
from pathlib import Path

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


class EvalSetConfig(dg.Config):
    """One declared eval set: ``path`` absolute or relative to the eval root; ``layout`` is
    ``manifest`` (the platform's split: manifest.parquet + tasks.json + tars) or
    ``clip_benchmark`` (its webdataset layout: test/nshards.txt, test/N.tar, classnames.txt ...).
    ``templates``: zero-shot prompts for a set that ships none (``simple``: generic ImageNet-style;
    a set's own ``templates`` in tasks.json or zeroshot_classification_templates.txt always win)."""

    name: str
    path: str
    layout: str = "manifest"
    templates: str = "simple"


class EvalReportsConfig(dg.Config):
    """The eval sets, each declared with its layout (empty: :data:`DEFAULT_EVAL_SETS`, the embedded
    dataset's held-out split ``emoji-heldout`` in the manifest layout), and the tasks to run
    (empty: every task of every set)."""

    eval_sets: list[EvalSetConfig] = []
    tasks: list[str] = []


DEFAULT_EVAL_SETS = ({"name": "emoji-heldout", "path": "emoji-heldout", "layout": "manifest", "templates": "simple"},)


@dg.asset(
    partitions_def=recipe_partitions,
    deps=[dg.AssetDep("trained_checkpoints")],
    group_name=GROUP,
    kinds={"pytorch", "delta"},
    description="Zero-shot classification and image<->text retrieval of every checkpoint of the recipe on "
    "the declared eval sets, run through clip_benchmark: the `eval_results` partition (task, metric, value "
    "per seed) and clip_benchmark's JSON under artifacts/eval/<recipe>/.",
)
def eval_reports(
    context: dg.AssetExecutionContext,
    config: EvalReportsConfig,
    lake: LakeResource,
    datasets: DatasetsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from curation.evaluate.benchmark import EvalSetSpec, evaluate_checkpoint, resolve_eval_sets
    from curation.evaluate.evaluator import AVERAGE_TASK, EvalTask, main_metric, results_to_rows
    from curation.train.checkpoints import resolve_artifact_path

    recipe = context.partition_key
    declared = [e.model_dump() for e in config.eval_sets] or list(DEFAULT_EVAL_SETS)
    specs = [
        EvalSetSpec(e["name"], str(Path(datasets.eval_root) / e["path"]), e["layout"], e["templates"]) for e in declared
    ]
    resolve_eval_sets(specs)  # validate layouts (and write the clip_benchmark datasets) before any model loads
    db = lake.lake()
    cks = db.read("checkpoints", partitions=[recipe]) if db.exists("checkpoints") else pl.DataFrame()
    if cks.height == 0:
        raise ValueError(f"recipe {recipe!r}: got no rows in `checkpoints`; expected trained_checkpoints materialized")
    spec = compute.spec()
    device = str(spec.torch_device())
    t0 = time.perf_counter()
    rows = []
    per_seed = []
    for ck in cks.iter_rows(named=True):
        seed = int(ck["seed"])
        path = resolve_artifact_path(ck["path"], lake.artifacts_root)
        out = lake.artifacts("eval", recipe, Path(ck["path"]).stem)
        res = evaluate_checkpoint(path, specs, out, model_name=ck["model"], device=device, precision=spec.precision,
                                  batch_size=spec.batch_size, task_names=config.tasks or None)  # fmt: skip
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
            "evaluator": "clip_benchmark",
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
