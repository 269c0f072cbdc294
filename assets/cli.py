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

    def training_config(asset: str) -> dict | None:
        if args.samples_seen is None:
            return None
        return {"ops": {asset: {"config": {"samples_seen": args.samples_seen}}}}

    t = time.perf_counter()
    print("[pool] concept_clusters, dedup_scores, complexity_scores, filter_model", flush=True)
    _materialize(defs, POOL_ASSETS, instance, run_config=training_config("filter_model"))
    timings.append(("pool-wide curation + filter model", time.perf_counter() - t))

    t = time.perf_counter()
    for i, recipe in enumerate(recipes, 1):
        print(f"[recipes {i}/{len(recipes)}] {recipe}: pruned_subsets -> trained_checkpoints -> eval_reports", flush=True)
        _materialize(defs, RECIPE_ASSETS, instance, partition_key=recipe, run_config=training_config("trained_checkpoints"))
    timings.append(("subsets + training + eval", time.perf_counter() - t))

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
        help="samples seen per training run (filter model and every recipe; default: the training config's)",
    )
    p.add_argument("--print-table", action="store_true", help="print the report's markdown table")
    p.set_defaults(func=cmd_demo)

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
