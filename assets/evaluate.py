"""Evaluate-stage assets: eval reports per recipe and the side-by-side curation report.

* ``eval_reports[recipe]``: every checkpoint of the recipe on the declared eval sets through
  clip_benchmark (:func:`curation.evaluate.benchmark.evaluate_checkpoint`; sets written in its
  webdataset layout, its result JSON under ``artifacts/eval/<recipe>/``) -> ``eval_results``.
* ``curation_report``: :func:`curation.evaluate.report.build_comparison` + ``write_report`` over all
  recipes -> ``artifacts/reports/`` (HTML, markdown, PNG plots).
"""


import json
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

    from curation.train.determinism import set_deterministic

    set_deterministic()  # the same thread count as training (docs/evidence.md)
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
    kept = db.partition_counts("subsets")
    pool = db.count_rows("embeddings") if db.exists("embeddings") else None
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
    from curation.evaluate.report import build_comparison, compute_curves, write_report
    from curation.select.controls import control_map

    db = lake.lake()
    if not db.exists("eval_results"):
        raise ValueError("curation_report: got no `eval_results` table; expected eval_reports materialized")
    ev = db.read("eval_results")
    cks = db.read("checkpoints") if db.exists("checkpoints") else pl.DataFrame()
    ev = ev.join(cks.select(pl.col("path").alias("checkpoint")), on="checkpoint", how="semi") if cks.height else ev
    kept, pool = subset_sizes(db)
    out_dir = lake.artifacts("reports")
    cands = candidate_counts(lake.artifacts_root, kept)
    comparison = build_comparison(ev, cks, kept, pool_size=pool, candidates=cands, controls=control_map())
    curves = compute_curves(ev, cks) if cks.height else None
    expected = list(recipe_partitions.get_partition_keys())
    missing = sorted(set(expected) - set(comparison["recipe"].to_list()))
    notes = [
        f"pool: {pool} samples; recipes: {comparison.height}" + (f" (not evaluated yet: {', '.join(missing)})" if missing else ""),
        "metrics: zero-shot mean per-class recall per label task (chance = 1 / classes), mean of "
        "image->text and text->image recall@1, and their average (DataComp style); all recipes train "
        "for the same number of samples seen (the main budget); mean ± std over training seeds.",
        "Δ control compares each pruning recipe with a seeded random subset of exactly its size drawn "
        "from the same candidate pool after the same SemDeDup chain (made automatically; named in parentheses). "
        "'of pool' / 'of candidates': kept fraction of the pool and of the post-dedup candidates.",
        "Best value per metric in bold.",
    ]
    sections = evidence_sections(db, out_dir, lake.artifacts_root)
    out = write_report(comparison, out_dir, notes=notes, curves=curves, sections=sections)
    best = comparison.sort("average", descending=True, nulls_last=True).row(0, named=True) if "average" in comparison.columns else None
    meta = {
        "recipes": comparison.height,
        "missing_recipes": dg.MetadataValue.json(missing),
        "report_html": dg.MetadataValue.path(str(out["html"])),
        "report_markdown": dg.MetadataValue.path(str(out["markdown"])),
        "plots": dg.MetadataValue.json([str(p) for p in out["plots"]]),
        "verdict": dg.MetadataValue.md("\n".join(f"- {v}" for v in out["verdict"])),
        "markdown": dg.MetadataValue.md(out["markdown_text"]),
        **previews.report_plots(out["plots"]), **previews.waterfall(lake), **previews.explorer(lake, datasets),
    }
    if best is not None:
        meta["best_recipe"] = best["recipe"]
        meta["best_average"] = float(best["average"])
    return dg.MaterializeResult(metadata=previews.rounded(meta))


def candidate_counts(artifacts_root: str, recipes) -> dict[str, int]:
    """recipe -> candidates after its SemDeDup chain, from ``artifacts/subsets/<recipe>/recipe.json``."""
    from pathlib import Path

    out = {}
    for r in recipes:
        p = Path(artifacts_root) / "subsets" / r / "recipe.json"
        if p.exists():
            n = json.loads(p.read_text()).get("n_candidates")
            if n:
                out[r] = int(n)
    return out


def evidence_sections(db: Lake, out_dir, artifacts_root: str) -> list[tuple[str, str]]:
    """Report sections beyond the table: DBP diagnostics per dbp recipe, and the latest filter audit."""
    from pathlib import Path

    from curation.select.controls import partition_names, resolve_recipe
    from curation.select.diagnostics import diagnose_dbp, diagnostics_markdown, plot_keep_vs_complexity
    from curation.select.pool_tables import read_recipe_pool

    sections: list[tuple[str, str]] = []
    dbps = [r for r in (resolve_recipe(n) for n in partition_names()) if r.method == "dbp"]
    if dbps and db.exists("assignments") and db.exists("clusters"):
        for r in dbps:
            try:
                pool = read_recipe_pool(db, r)  # what the recipe itself reads (dedup scores, d_inter)
            except ValueError as e:  # e.g. dedup_scores not materialized yet: no diagnostics for it
                log.info("DBP diagnostics of %s skipped: %s", r.name, e)
                continue
            d = diagnose_dbp(r, pool)
            png = plot_keep_vs_complexity(d["complexity"], d["sizes"], d["dbp"], d["ssp"], Path(out_dir) / f"dbp_diagnostics_{r.name.replace('@', '_').replace('=', '_')}.png",
                                          title=f"{r.name}: kept fraction of each cluster against its complexity (DBP vs SSP)")  # fmt: skip
            sections.append((f"DBP diagnostics: {r.name}", diagnostics_markdown(d["current"], d["sweep"], r.tau) + f"\n\n![{png.stem}]({png.name})"))
    audit_md = Path(artifacts_root) / "audit" / "audit.md"
    examples = audit_md.parent / "audit_examples.png"
    if examples.exists():  # the report references images by name beside it
        import shutil

        shutil.copy(examples, Path(out_dir) / examples.name)
    if audit_md.exists():
        sections.append(("Filter audit on planted noise (`curation audit`)", audit_md.read_text()))
    return sections


ASSETS = [eval_reports, curation_report]
