"""The ``curation`` command: library commands (datasets) plus orchestration (demo, ui, runs).

``curation/cli.py`` holds the commands that need no Dagster (``curation datasets ...``); this
module adds the ones that drive the Dagster definitions, keeping imports one way
(assets -> curation).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from assets.stages import POOL_ASSETS, RECIPE_ASSETS, REPORT_ASSETS, SHARD_ASSETS

log = logging.getLogger("curation")

REPO_ROOT = Path(__file__).resolve().parent.parent



def _default_env() -> None:
    """Point Dagster at the shipped instance and keep every model load offline."""
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))
    os.environ.setdefault("CURATION_HOME", str(Path.cwd() / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("CURATION_TORCH_THREADS", "2")  # pinned + recorded (docs/evidence.md)
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)


def _instance():
    from dagster import DagsterInstance

    return DagsterInstance.get()


def _materialize(defs, keys, instance, partition_key=None, run_config=None):
    """Materialize ``keys`` (and their checks) of ``defs`` in process on ``instance``."""
    from dagster import AssetSelection, materialize

    all_defs = list(defs.assets or []) + list(defs.asset_checks or [])
    run_config = dict(run_config or {})
    run_config.setdefault("loggers", {"console": {"config": {"log_level": os.environ.get("CURATION_DAGSTER_LOG_LEVEL", "WARNING")}}})
    result = materialize(
        all_defs,
        selection=AssetSelection.assets(*keys),
        instance=instance,
        resources=defs.resources,
        partition_key=partition_key,
        run_config=run_config,
        raise_on_error=True,
        tags={"curation/source": "cli"},
    )
    for c in (c for c in result.get_asset_check_evaluations() if not c.passed):
        log.warning("check %s on %s failed: %s", c.check_name, c.asset_key.to_user_string(), c.metadata)
    return result


def _shard_keys(defs) -> list[str]:
    from curation.ingest.shards import find_shards

    landing = defs.resources["datasets"].landing
    return sorted(find_shards(landing))


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the default dataset if missing, then materialize the whole lineage on it."""
    from assets.definitions import defs
    from assets.partitions import SHARDS, recipe_partitions
    from curation.ingest.emoji_dataset import build_default_dataset
    from curation.storage.data_home import data_home

    valid = recipe_partitions.get_partition_keys()
    recipes = args.recipes or valid
    unknown = [r for r in recipes if r not in valid]
    if unknown:
        print(f"unknown recipes {unknown}; expected any of {valid}", file=sys.stderr)
        return 2
    home = data_home()
    landing = Path(defs.resources["datasets"].landing)
    t0 = time.perf_counter()
    timings: list[tuple[str, float]] = []
    if not any(landing.glob("*/*.tar")) or args.rebuild:
        print(f"building the default dataset into {home} ...", flush=True)
        build_default_dataset(home, limit=args.limit)
        timings.append(("dataset", time.perf_counter() - t0))
    instance = _instance()
    keys = _shard_keys(defs)
    if not keys:
        print(f"no shards in {landing}", file=sys.stderr)
        return 1
    instance.add_dynamic_partitions(SHARDS, [k for k in keys if not instance.has_dynamic_partition(SHARDS, k)])

    t = time.perf_counter()
    for i, key in enumerate(keys, 1):
        print(f"[shards {i}/{len(keys)}] {key}: raw_shards -> samples -> embeddings", flush=True)
        _materialize(defs, SHARD_ASSETS, instance, partition_key=key)
    timings.append(("ingest + embeddings", time.perf_counter() - t))

    def training_config(asset: str, recipe: str | None = None) -> dict | None:
        cfg = {} if args.samples_seen is None else {"samples_seen": args.samples_seen}
        if asset == "trained_checkpoints":
            cfg.update(evidence_training_config(args, recipe))
        return {"ops": {asset: {"config": cfg}}} if cfg else None

    t = time.perf_counter()
    print("[pool] concept_clusters, dedup_scores, complexity_scores, filter_model", flush=True)
    _materialize(defs, POOL_ASSETS, instance, run_config=training_config("filter_model"))
    timings.append(("pool-wide curation + filter model", time.perf_counter() - t))

    t = time.perf_counter()
    for i, recipe in enumerate(recipes, 1):
        print(f"[recipes {i}/{len(recipes)}] {recipe}: pruned_subsets -> trained_checkpoints -> eval_reports", flush=True)
        _materialize(defs, RECIPE_ASSETS, instance, partition_key=recipe, run_config=training_config("trained_checkpoints", recipe))
    timings.append(("subsets + training + eval", time.perf_counter() - t))

    if getattr(args, "audit", False):
        t = time.perf_counter()
        print("[audit] planting labelled noise in a copy of the pool and curating it", flush=True)
        run_audit(argparse.Namespace(dataset=None, shards=args.audit_shards, seed=0, recipes=args.audit_recipes,
                                     samples_seen=args.audit_samples_seen, home=None))  # fmt: skip
        timings.append(("filter audit", time.perf_counter() - t))

    t = time.perf_counter()
    result = _materialize(defs, REPORT_ASSETS, instance)
    timings.append(("report", time.perf_counter() - t))

    report = None
    for ev in result.get_asset_materialization_events():
        md = ev.materialization.metadata
        if "report_html" in md:
            report = md["report_html"].value
        if "markdown" in md and args.print_table:
            print(md["markdown"].value)
    total = time.perf_counter() - t0
    print("\nstage timings:")
    for name, sec in timings:
        print(f"  {name:<36s} {sec:8.1f} s")
    print(f"  {'total':<36s} {total:8.1f} s")
    print(f"\nDelta tables: {defs.resources['lake'].root}")
    print(f"Report:       {report or Path(defs.resources['lake'].artifacts_root) / 'reports'}")
    print("Browse the lineage, metadata and checks with: curation ui")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    """Materialize chosen assets (optionally one partition) in process."""
    from assets.definitions import defs

    _materialize(defs, args.assets, _instance(), partition_key=args.partition)
    print(f"materialized {', '.join(args.assets)}" + (f" [{args.partition}]" if args.partition else ""))
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    """Launch a backfill of the recipe job over all (or chosen) recipes."""
    from assets.backfill import backfill_recipes

    backfill_id = backfill_recipes(_instance(), recipes=args.recipes or None)
    print(f"backfill {backfill_id} submitted; the daemon (curation ui / dagster dev) runs it")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the Dagster UI (webserver + daemon) on the shipped instance until Ctrl-C."""
    from assets.ui import start_ui, stop_ui

    proc = start_ui(host=args.host, port=args.port, dagster_home=os.environ["DAGSTER_HOME"])
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={os.environ['DAGSTER_HOME']}); Ctrl-C stops it")
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(proc)
    return 0


# The demo's evidence settings (docs/evidence.md: 3 seeds, compute curves, the audit; timed to fit
# `make demo` in 15 minutes on 2 idle cores).
DEMO_SEEDS = [0, 1, 2]
DEMO_SAMPLES_SEEN = 4096
DEMO_SAMPLES_SEEN_MULTIPLES = [0.25, 1.0]
DEMO_CURVE_RECIPES = ["full", "dbp@0.5", "random@0.5+semdedup"]
DEMO_AUDIT_SHARDS = 3
DEMO_AUDIT_RECIPES = ["full", "semdedup@eps=0.05", "clipscore@0.5"]
DEMO_AUDIT_SAMPLES_SEEN = 4096


def evidence_training_config(args: argparse.Namespace, recipe: str | None = None) -> dict:
    """trained_checkpoints config keys from the demo's evidence options: seeds for every recipe,
    compute-curve budgets for the ``--curve-recipes`` (all recipes when that list is empty)."""
    cfg: dict = {}
    if getattr(args, "samples_seen", None) is None:
        cfg["samples_seen"] = DEMO_SAMPLES_SEEN
    if getattr(args, "seeds", None):
        cfg["seeds"] = [int(x) for x in args.seeds]
    curve = getattr(args, "curve_recipes", None)
    if getattr(args, "samples_seen_multiples", None) and (not curve or recipe in curve):
        cfg["samples_seen_multiples"] = [float(x) for x in args.samples_seen_multiples]
    return cfg


def run_audit(args: argparse.Namespace) -> int:
    """`curation audit`: plant labelled noise in a copy of a landing dataset, curate it in its own
    data home (``$CURATION_HOME/audit``), score every filter, write ``artifacts/audit/audit.md``."""
    import shutil
    import subprocess

    import polars as pl

    from curation.evaluate.audit import audit_markdown, plant_noise, score_audit
    from curation.evaluate.report import build_comparison
    from curation.select.controls import resolve_recipe
    from curation.select.recipes import recipe_names
    from curation.storage.data_home import data_home
    from curation.storage.lake import Lake

    home = data_home()
    landing = home / "landing"
    datasets = sorted(p.name for p in landing.iterdir() if p.is_dir() and any(p.glob("*.tar"))) if landing.exists() else []
    if not datasets:
        print(f"no landing datasets with shards under {landing}; build one with: curation datasets build default", file=sys.stderr)
        return 1
    dataset = args.dataset or datasets[0]
    if dataset not in datasets:
        print(f"unknown dataset {dataset!r}; expected one of {datasets}", file=sys.stderr)
        return 2
    recipes = args.recipes or recipe_names()
    valid = recipe_names()
    unknown = [r for r in recipes if r not in valid]
    if unknown:
        print(f"unknown recipes {unknown}; expected any of {valid}", file=sys.stderr)
        return 2
    audit_home = Path(args.home) if args.home else home / "audit"
    name = f"{dataset}_audit"
    if (audit_home / "lake").exists():
        shutil.rmtree(audit_home / "lake")  # a fresh audit every time: labels and lake must match
    for sub in ("artifacts", "dagster_home"):
        shutil.rmtree(audit_home / sub, ignore_errors=True)
    res = plant_noise(landing / dataset, audit_home / "landing" / name, name, seed=args.seed, max_shards=args.shards)
    if (home / "eval").exists():
        shutil.copytree(home / "eval", audit_home / "eval", dirs_exist_ok=True)
    dh = audit_home / "dagster_home"
    dh.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", dh / "dagster.yaml")
    env = {**os.environ, "CURATION_HOME": str(audit_home), "DAGSTER_HOME": str(dh), "CURATION_AUTOMATION": "off", "CURATION_CONTROLS": "off"}
    cmd = [sys.executable, "-m", "assets.cli", "demo", "--recipes", *recipes, "--seeds", "0", "--samples-seen-multiples", "--no-audit"]
    if args.samples_seen:
        cmd += ["--samples-seen", str(args.samples_seen)]
    print(f"[audit] curating {name} ({res.labels.height} planted/modified, {res.n_clean} clean) in {audit_home}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=str(REPO_ROOT), stdout=subprocess.DEVNULL)
    db = Lake(str(audit_home / "lake"))
    eps = sorted({r.eps if r.method == "semdedup" else r.after_semdedup_eps for r in map(resolve_recipe, recipes)} - {None})
    clipscore = [r for r in recipes if resolve_recipe(r).method == "clipscore"]
    result = score_audit(
        res.labels,
        db.read("samples", columns=["uid", "dataset", "shard", "key"]),
        db.read("quarantine") if db.exists("quarantine") else pl.DataFrame(schema={"dataset": pl.String, "shard": pl.String, "key": pl.String}),
        db.read("dedup_scores", columns=["uid", "max_sim_to_earlier"]) if db.exists("dedup_scores") else None,
        db.read("filter_embeddings", columns=["uid", "clip_score"]) if db.exists("filter_embeddings") else None,
        db.read("subsets", columns=["recipe", "uid"]) if db.exists("subsets") else None,
        dedup_eps=eps or [0.05],
        clipscore_recipes=clipscore,
    )  # fmt: skip
    models = None
    if db.exists("eval_results"):
        kept = dict(db.read("subsets", columns=["recipe", "uid"]).group_by("recipe").len().iter_rows())
        cmp = build_comparison(db.read("eval_results"), db.read("checkpoints"), kept)
        models = cmp.select("recipe", "kept", "seeds", "average", "delta_full")
    counts = dict(res.labels.group_by("kind").len().sort("kind").iter_rows())
    header = (f"Dataset `{dataset}`: {args.shards or 'all'} shard(s) copied to `{name}` with planted noise {counts} "
              f"({res.n_clean} clean samples; seed {args.seed}). Recipes: {', '.join(recipes)}.\n")  # fmt: skip
    md = audit_markdown(result, models, header)
    from curation.evaluate.audit import plot_examples

    q = db.read("quarantine", columns=["shard", "key"]) if db.exists("quarantine") else None
    subs = db.read("subsets", columns=["recipe", "uid"]) if db.exists("subsets") else None
    kept_sets = {r: set(g["uid"].to_list()) for (r,), g in subs.group_by("recipe")} if subs is not None else {}
    (home / "artifacts" / "audit").mkdir(parents=True, exist_ok=True)
    png = plot_examples(res.labels, res.out_dir, db.read("samples", columns=["uid", "shard", "key"]),
                        set(zip(q["shard"].to_list(), q["key"].to_list())) if q is not None else set(), kept_sets,
                        home / "artifacts" / "audit" / "audit_examples.png")  # fmt: skip
    md += f"\n\n![{png.stem}]({png.name})"
    for out in (home / "artifacts" / "audit", audit_home / "artifacts" / "audit"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.md").write_text(md + "\n", encoding="utf-8")
        result["filters"].write_parquet(out / "filters.parquet")
        result["kept"].write_parquet(out / "kept.parquet")
        res.labels.write_parquet(out / "labels.parquet")
    print(md)
    print(f"\nAudit: {home / 'artifacts' / 'audit' / 'audit.md'} (the next curation_report includes it)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Plant labelled noise in a copy of a landing dataset and score each filter on it."""
    return run_audit(args)


def build_parser() -> argparse.ArgumentParser:
    from curation.ingest.datasets_cli import add_library_commands

    parser = argparse.ArgumentParser(
        prog="curation",
        description="Curate image-caption data for CLIP training: SemDeDup, density-based pruning, "
        "CLIPCov; train and evaluate CLIP models on each subset.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_library_commands(sub)

    p = sub.add_parser("demo", help="build the default dataset if missing and run the whole lineage")
    p.add_argument("--recipes", nargs="*", help="recipes to run (default: all in the recipe config)")
    p.add_argument("--limit", type=int, default=None, help="build the dataset from at most N concepts")
    p.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if shards exist")
    p.add_argument(
        "--samples-seen", type=int, default=None,
        help=f"samples seen per training run (filter model and every recipe; default: {DEMO_SAMPLES_SEEN} per recipe, "
        "the training config's for the filter model)",
    )
    p.add_argument("--print-table", action="store_true", help="print the report's markdown table")
    p.add_argument("--seeds", nargs="+", type=int, default=DEMO_SEEDS, help=f"training seeds per recipe (default: {DEMO_SEEDS})")
    p.add_argument(
        "--samples-seen-multiples", nargs="*", type=float, default=DEMO_SAMPLES_SEEN_MULTIPLES,
        help=f"extra compute-curve budgets as multiples of the pool size (default: {DEMO_SAMPLES_SEEN_MULTIPLES}; none: no curves)",
    )
    p.add_argument("--curve-recipes", nargs="*", default=DEMO_CURVE_RECIPES,
                   help=f"recipes trained at the compute-curve budgets (default: {DEMO_CURVE_RECIPES}; empty: all)")
    p.add_argument("--no-audit", dest="audit", action="store_false", help="skip the filter audit")
    p.add_argument("--audit-shards", type=int, default=DEMO_AUDIT_SHARDS, help=f"shards the audit copies (default: {DEMO_AUDIT_SHARDS})")
    p.add_argument("--audit-recipes", nargs="*", default=DEMO_AUDIT_RECIPES, help=f"recipes the audit runs (default: {DEMO_AUDIT_RECIPES})")
    p.add_argument("--audit-samples-seen", type=int, default=DEMO_AUDIT_SAMPLES_SEEN, help="samples seen per audit model")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("audit", help="plant labelled noise in a copy of a landing dataset, curate it, score every filter")
    p.add_argument("--dataset", help="landing dataset to copy (default: the first one)")
    p.add_argument("--shards", type=int, default=None, help="copy only the first N shards (default: all)")
    p.add_argument("--recipes", nargs="*", help="recipes to run on the noisy copy (default: all in the recipe config)")
    p.add_argument("--samples-seen", type=int, default=None, help="samples seen per model (default: the training config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted noise")
    p.add_argument("--home", help="data home of the audit copy (default: $CURATION_HOME/audit)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("materialize", help="materialize assets in process on the instance")
    p.add_argument("assets", nargs="+", help="asset keys, e.g. samples embeddings")
    p.add_argument("--partition", help="partition key (a shard key or a recipe name)")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("backfill", help="backfill the recipe job over recipes (run by the daemon)")
    p.add_argument("--recipes", nargs="*", help="recipes (default: all)")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("ui", help="start the Dagster UI on the instance the demo used")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    _default_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
