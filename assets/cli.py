"""The ``curation`` command: library commands (datasets, explain, explore) plus orchestration
(demo, materialize, shards, backfill, ui).

``curation/ingest/datasets_cli.py`` holds the commands that need no Dagster; this module adds
the ones that drive the Dagster definitions, keeping imports one way (assets -> curation).

Startup stays fast: nothing heavy is imported for ``--help`` or for a usage error. Names
(assets, recipes, shard partitions, run-config ops) are checked up front against light
sources (:mod:`assets.stages`, the recipe YAML, the landing directory) so a mistake costs one
line on stderr and exit status 2, never a traceback. Runs are launched as the named jobs of
:mod:`assets.jobs` (``shard_ingest_job``, ``pool_curation_job``, ``recipe_job``,
``report_job``), so the UI's Runs page shows them under those names with the
``curation/source=cli`` tag.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from assets.stages import (
    POOL_ASSETS,
    RECIPE_ASSETS,
    REPORT_ASSETS,
    SHARD_ASSETS,
    STAGE_TAG,
)

log = logging.getLogger("curation")

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGE_JOBS = (  # lineage order: (job name, its assets, partitioned by)
    ("shard_ingest_job", SHARD_ASSETS, "shard"),
    ("pool_curation_job", POOL_ASSETS, None),
    ("recipe_job", RECIPE_ASSETS, "recipe"),
    ("report_job", REPORT_ASSETS, None),
)
ALL_ASSETS = tuple(a for _, assets, _ in STAGE_JOBS for a in assets)
SOURCE_TAG = "curation/source"

ENV_HELP = """environment:
  CURATION_HOME     data home: landing/, eval/, lake/, artifacts/ (default: ./data)
  DAGSTER_HOME      Dagster instance: run history the UI shows (default: the repo's dagster_home/)
  CURATION_RECIPES  recipe file (default: curation/select/recipes.yaml); its names are the
                    recipe partitions
  CURATION_DAGSTER_LOG_LEVEL  level of Dagster's console log during runs (default: WARNING)

examples:
  curation demo --recipes full dbp@0.5            whole lineage on the embedded emoji dataset
  curation shards register                        register landed shards as partitions
  curation materialize samples embeddings --partition mydata-00000
  curation materialize pruned_subsets trained_checkpoints --partition dbp@0.5 --config run.yaml
  curation explain 5b8058f3cbf027feda783fe052a99248
  curation explore                                write artifacts/reports/explorer.html
"""


class CliError(Exception):
    """A usage, name or config error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- environment


def _default_env() -> None:
    """Point Dagster at the shipped instance and keep every model load offline."""
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))
    os.environ.setdefault("CURATION_HOME", str(Path.cwd() / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("CURATION_TORCH_THREADS", "2")  # pinned + recorded (docs/evidence.md)


def _quiet_dagster() -> None:
    """No PreviewWarning/BetaWarning or alembic INFO lines on every command; an instance
    directory without dagster.yaml gets the shipped one (telemetry off, no warning)."""
    import shutil
    import warnings

    from dagster._utils.warnings import BetaWarning, PreviewWarning

    warnings.filterwarnings("ignore", category=PreviewWarning)
    warnings.filterwarnings("ignore", category=BetaWarning)
    for name in ("alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    shipped = REPO_ROOT / "dagster_home" / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and shipped.exists():
        shutil.copy(shipped, home / "dagster.yaml")


def _instance():
    _quiet_dagster()
    from dagster import DagsterInstance

    return DagsterInstance.get()


def _defs():
    _quiet_dagster()
    from assets.definitions import get_defs

    return get_defs()


def _data_home() -> Path:
    return Path(os.environ.get("CURATION_HOME") or "data")


def _landing() -> Path:
    return _data_home() / "landing"


# --------------------------------------------------------------------------- light name checks


def recipe_names() -> list[str]:
    """Recipe names from the recipe file, read with PyYAML only (no numpy/polars/dagster)."""
    import yaml

    path = os.environ.get("CURATION_RECIPES") or str(REPO_ROOT / "curation" / "select" / "recipes.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise CliError(f"recipe file: got {path!r} (CURATION_RECIPES), which does not exist; expected a YAML file with a 'recipes:' mapping") from None
    except yaml.YAMLError as e:
        raise CliError(f"recipe file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    recipes = doc.get("recipes") if isinstance(doc, dict) else None
    if not isinstance(recipes, dict) or not recipes:
        raise CliError(f"recipe file {path}: got no 'recipes:' mapping; expected 'recipes: {{name: {{method: ...}}}}'")
    return [str(k) for k in recipes]


def landing_shard_keys(landing: Path | None = None) -> list[str]:
    """``<dataset>-<stem>`` of every ``landing/<dataset>/<stem>.tar`` (same rules as
    :func:`curation.ingest.shards.find_shards`, without importing it)."""
    root = landing or _landing()
    if not root.is_dir():
        return []
    keys = []
    for ds in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for tar in sorted(ds.glob("*.tar")):
            if not tar.name.startswith((".", "_")) and "-" not in tar.stem:
                keys.append(f"{ds.name}-{tar.stem}")
    return keys


def _choices(values, limit: int = 12) -> str:
    values = list(values)
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "") if values else "(none)"


def check_assets(assets: list[str]) -> None:
    unknown = [a for a in assets if a not in ALL_ASSETS]
    if unknown:
        raise CliError(f"unknown asset{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; expected some of {', '.join(ALL_ASSETS)}")


def recipe_partition_keys() -> list[str]:
    """Every per-recipe partition: the recipe file's names, then the size-matched random controls
    derived for the pruning recipes (curation.select.controls)."""
    from curation.select.controls import partition_names

    recipe_names()  # a missing or broken recipe file is one clear line
    return partition_names()


def check_recipes(recipes: list[str]) -> list[str]:
    valid = recipe_names()
    unknown = [r for r in recipes if r not in valid]
    if unknown:  # derived controls are partitions too
        valid = recipe_partition_keys()
        unknown = [r for r in recipes if r not in valid]
    if unknown:
        raise CliError(f"unknown recipes {unknown}; expected any of {valid}")
    return recipes


def plan_runs(assets: list[str], partition: str | None) -> list[tuple[str, list[str], str | None]]:
    """``[(job name, assets, partition key)]`` in lineage order for ``materialize``.

    Raises:
        CliError: unknown asset; a partitioned asset without ``--partition`` (lists the
            keys); a partition that is not a key of the assets' partitions; a partition
            given for unpartitioned assets only; shard and recipe assets in one command.
    """
    check_assets(assets)
    chosen = set(assets)
    runs = [(job, [a for a in stage if a in chosen], kind) for job, stage, kind in STAGE_JOBS]
    runs = [r for r in runs if r[1]]
    kinds = {kind for _, _, kind in runs if kind}
    if len(kinds) > 1:
        raise CliError("shard assets and recipe assets take different partitions; materialize them in separate commands")
    kind = kinds.pop() if kinds else None
    if kind is None:
        if partition is not None:
            raise CliError(f"--partition: got {partition!r} but {', '.join(assets)} {'is' if len(assets) == 1 else 'are'} not partitioned; drop --partition")
        return [(job, a, None) for job, a, _ in runs]
    keys = landing_shard_keys() if kind == "shard" else recipe_names()
    if kind == "recipe" and partition not in keys:
        keys = recipe_partition_keys()
    partitioned = [a for _, al, k in runs if k for a in al]
    if partition is None:
        where = f" (landing zone {_landing()})" if kind == "shard" else ""
        raise CliError(
            f"{', '.join(partitioned)} {'is' if len(partitioned) == 1 else 'are'} partitioned by {kind}: pass --partition with one of: {_choices(keys)}{where}"
        )
    if partition not in keys:
        where = f" in the landing zone {_landing()}" if kind == "shard" else ""
        raise CliError(f"--partition: got {partition!r}; expected a {kind} key{where}: {_choices(keys)}")
    return [(job, a, partition if k else None) for job, a, k in runs]


def load_run_config(path: str | None) -> dict:
    """Run config from a YAML file (``ops: {asset: {config: {...}}}``, optionally ``resources:``)."""
    if not path:
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise CliError(f"--config: got {path!r}, which does not exist; expected a YAML run-config file") from None
    except yaml.YAMLError as e:
        raise CliError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise CliError(f"--config {path}: got a {type(doc).__name__}; expected a mapping with 'ops:' (and optionally 'resources:')")
    extra = sorted(set(doc) - {"ops", "resources", "loggers", "execution"})
    if extra:
        raise CliError(f"--config {path}: unknown top-level keys {extra}; expected some of ['ops', 'resources']")
    ops = doc.get("ops") or {}
    if not isinstance(ops, dict):
        raise CliError(f"--config {path}: 'ops' must map asset names to {{config: ...}}")
    check = [o for o in ops if o not in ALL_ASSETS]
    if check:
        raise CliError(f"--config {path}: unknown asset {check[0]!r} under ops; expected some of {', '.join(ALL_ASSETS)}")
    return doc


def _job_run_config(run_config: dict, assets: list[str]) -> dict:
    out = {k: v for k, v in run_config.items() if k not in ("ops",)}
    ops = {k: v for k, v in (run_config.get("ops") or {}).items() if k in assets}
    if ops:
        out["ops"] = ops
    out.setdefault("loggers", {"console": {"config": {"log_level": os.environ.get("CURATION_DAGSTER_LOG_LEVEL", "WARNING")}}})
    return out


# --------------------------------------------------------------------------- running jobs


def register_shards(instance, keys: list[str]) -> list[str]:
    """Add the shard keys the instance does not know yet as ``shards`` partitions; returns them."""
    from assets.partitions import SHARDS

    new = [k for k in keys if not instance.has_dynamic_partition(SHARDS, k)]
    if new:
        instance.add_dynamic_partitions(SHARDS, new)
    return new


def run_job(defs, instance, job_name: str, assets: list[str], partition: str | None = None, run_config: dict | None = None):
    """Execute the named job in process for ``assets`` (and their checks) on ``instance``.

    Returns the result. Raises :class:`CliError` for invalid run config and
    :class:`RunFailed` (one line: the failed step and its error) when a step fails.
    """
    from dagster import AssetKey
    from dagster._core.errors import DagsterInvalidConfigError

    job = defs.resolve_job_def(job_name)
    try:
        result = job.execute_in_process(
            run_config=_job_run_config(run_config or {}, assets),
            instance=instance,
            partition_key=partition,
            asset_selection=[AssetKey(a) for a in assets],
            tags={SOURCE_TAG: "cli", STAGE_TAG: job_name.replace("_job", "")},
            raise_on_error=False,
        )
    except DagsterInvalidConfigError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CliError(f"invalid run config for {job_name}: " + " ".join(lines[1:4] or lines[:1])) from None
    for c in (c for c in result.get_asset_check_evaluations() if not c.passed):
        log.warning("check %s on %s failed: %s", c.check_name, c.asset_key.to_user_string(),
                    {k: v.value for k, v in c.metadata.items()})
    return _succeeded(result, job_name)


def _succeeded(result, job_name: str):
    """``result`` when its run succeeded; else :class:`RunFailed` naming the failed step."""
    if not result.success:
        failures = [ev for ev in result.all_events if ev.is_step_failure]
        if failures:
            ev = failures[0]
            err = ev.step_failure_data.error
            msg = (err.cause.message if err and err.cause else (err.message if err else "failed")).strip().splitlines()[-1]
            raise RunFailed(f"{job_name} run {result.run_id[:8]} failed at {ev.step_key}: {msg}")
        raise RunFailed(f"{job_name} run {result.run_id[:8]} did not succeed")
    return result


class RunFailed(Exception):
    """A run that started and failed: one line, exit status 1."""


# --------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the default dataset if missing, then run the whole lineage as the named jobs."""
    recipes = check_recipes(args.recipes) if args.recipes else demo_recipes()
    run_config = load_run_config(args.config)
    if args.samples_seen is not None:
        for asset in ("filter_model", "trained_checkpoints"):
            run_config.setdefault("ops", {}).setdefault(asset, {}).setdefault("config", {})["samples_seen"] = args.samples_seen
    from curation.ingest.emoji_dataset import build_default_dataset

    home = _data_home()
    defs = _defs()
    landing = Path(defs.resources["datasets"].landing)
    t0 = time.perf_counter()
    timings: list[tuple[str, float]] = []
    if not any(landing.glob("*/*.tar")) or args.rebuild:
        print(f"building the default dataset into {home} ...", flush=True)
        build_default_dataset(home, limit=args.limit)
        timings.append(("dataset", time.perf_counter() - t0))
    instance = _instance()
    keys = landing_shard_keys(landing)
    if not keys:
        print(f"no shards in {landing}", file=sys.stderr)
        return 1
    register_shards(instance, keys)

    t = time.perf_counter()
    for i, key in enumerate(keys, 1):
        print(f"[shards {i}/{len(keys)}] {key}: shard_ingest_job (raw_shards -> samples -> embeddings)", flush=True)
        run_job(defs, instance, "shard_ingest_job", list(SHARD_ASSETS), key, run_config)
    timings.append(("ingest + embeddings", time.perf_counter() - t))

    from curation.select.recipes import load_recipes

    known = load_recipes()
    pool_assets = [a for a in POOL_ASSETS if a != "filter_model" or any(r in known and known[r].needs_aligned for r in recipes)]
    t = time.perf_counter()
    print(f"[pool] pool_curation_job: {', '.join(pool_assets)}"
          + ("" if "filter_model" in pool_assets else " (no chosen recipe needs filter_model)"), flush=True)
    run_job(defs, instance, "pool_curation_job", pool_assets, None, run_config)
    timings.append(("pool-wide curation + filter model", time.perf_counter() - t))

    t = time.perf_counter()
    for i, recipe in enumerate(recipes, 1):
        print(f"[recipes {i}/{len(recipes)}] {recipe}: recipe_job (pruned_subsets -> trained_checkpoints -> eval_reports)", flush=True)
        run_job(defs, instance, "recipe_job", list(RECIPE_ASSETS), recipe, with_evidence(run_config, args, recipe))
    timings.append(("subsets + training + eval", time.perf_counter() - t))

    if getattr(args, "audit", False):
        t = time.perf_counter()
        print("[audit] planting labelled noise in a copy of the pool and curating it", flush=True)
        run_audit(argparse.Namespace(dataset=None, shards=args.audit_shards, seed=0, recipes=args.audit_recipes,
                                     samples_seen=args.audit_samples_seen, home=None))  # fmt: skip
        timings.append(("filter audit", time.perf_counter() - t))

    t = time.perf_counter()
    result = run_job(defs, instance, "report_job", list(REPORT_ASSETS), None, run_config)
    timings.append(("report + explorer", time.perf_counter() - t))

    report = explorer = None
    for ev in result.get_asset_materialization_events():
        md = ev.materialization.metadata
        if "report_html" in md:
            report = md["report_html"].value
        if "explorer_html" in md:
            explorer = md["explorer_html"].value
        if "markdown" in md and args.print_table:
            print(md["markdown"].value)
    total = time.perf_counter() - t0
    print("\nstage timings:")
    for name, sec in timings:
        print(f"  {name:<36s} {sec:8.1f} s")
    print(f"  {'total':<36s} {total:8.1f} s")
    print(f"\nDelta tables: {defs.resources['lake'].root}")
    print(f"Report:       {report or Path(defs.resources['lake'].artifacts_root) / 'reports'}")
    if explorer:
        print(f"Explorer:     {explorer}")
    print("Browse the lineage, metadata and checks with: curation ui")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    """Materialize chosen assets (one partition where they are partitioned) as the named jobs."""
    runs = plan_runs(args.assets, args.partition)
    run_config = load_run_config(args.config)
    defs = _defs()
    instance = _instance()
    if any(job == "shard_ingest_job" for job, _, _ in runs):
        if register_shards(instance, [args.partition]):
            print(f"registered shard partition {args.partition}")
    for job, assets, part in runs:
        res = run_job(defs, instance, job, assets, part, run_config)
        print(f"{job} run {res.run_id}: materialized {', '.join(assets)}" + (f" [{part}]" if part else ""))
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    """Run ``lake_maintenance_job`` in process (compact the layout, vacuum old files) on the
    instance, so the run shows in the UI beside the scheduled ones."""
    if args.retention_hours < 0:
        raise CliError(f"--retention-hours: got {args.retention_hours}; expected >= 0")
    if args.compact_min_files is not None and args.compact_min_files < 2:
        raise CliError(f"--compact-min-files: got {args.compact_min_files}; expected >= 2")
    from curation.storage.lake import TABLES

    unknown = sorted(set(args.tables or []) - set(TABLES))
    if unknown:
        raise CliError(f"--tables: got unknown tables {unknown}; expected some of {_choices(sorted(TABLES))}")
    config = {"compact_min_files": None if args.no_compact else args.compact_min_files or 2,
              "retention_hours": args.retention_hours, "tables": list(args.tables or []), "dry_run": args.dry_run}
    job = "lake_maintenance_job"
    result = _succeeded(_defs().resolve_job_def(job).execute_in_process(
        run_config={"ops": {"maintain_lake": {"config": config}}}, instance=_instance(),
        tags={SOURCE_TAG: "cli", STAGE_TAG: "maintenance"}, raise_on_error=False), job)
    out = result.output_for_node("maintain_lake")
    before, after = out["layout_files"]
    print(f"{job} run {result.run_id}" + (" (dry run: nothing changed)" if args.dry_run else ""))
    if before is None:
        print("layout: no pool_by_cluster table yet")
    elif out["compaction_skipped"]:
        print(f"layout: {before} files, compaction skipped ({out['compaction_skipped']})")
    else:
        n = len(out["compacted_buckets"])
        print(f"layout: would compact {n} buckets ({before} files now)" if args.dry_run
              else f"layout: compacted {n} buckets ({before} -> {after} files)")
    freed = out["files_vacuumed"]
    size = "" if out["bytes_freed"] is None else f", {out['bytes_freed'] / 2**20:.1f} MiB"
    print(f"vacuum (files older than {args.retention_hours} h that no commit references): "
          f"{sum(freed.values())} files{size}" + "".join(f"\n  {t}: {n}" for t, n in sorted(freed.items())))
    return 0


def cmd_shards_register(args: argparse.Namespace) -> int:
    """Register every landed shard (or those of ``--dataset``) as a ``shards`` partition."""
    keys = landing_shard_keys()
    if args.dataset:
        datasets = sorted({k.rpartition("-")[0] for k in keys})
        if args.dataset not in datasets:
            raise CliError(f"--dataset: got {args.dataset!r}; expected one of the datasets in {_landing()}: {_choices(datasets)}")
        keys = [k for k in keys if k.rpartition("-")[0] == args.dataset]
    if not keys:
        raise CliError(f"no shards in the landing zone {_landing()}; expected landing/<dataset>/<stem>.tar (see docs/your-data.md)")
    new = register_shards(_instance(), keys)
    print(f"{len(new)} new shard partitions registered ({len(keys) - len(new)} already known) under DAGSTER_HOME={os.environ['DAGSTER_HOME']}")
    for k in new:
        print(f"  {k}")
    return 0


def cmd_shards_list(args: argparse.Namespace) -> int:
    from assets.partitions import SHARDS

    known = set(_instance().get_dynamic_partitions(SHARDS))
    for k in landing_shard_keys():
        print(f"{k}\t{'registered' if k in known else 'not registered (curation shards register)'}")
    for k in sorted(known - set(landing_shard_keys())):
        print(f"{k}\tregistered, no longer in the landing zone")
    return 0


def _lake():
    from curation.storage.lake import Lake

    root = _data_home() / "lake"
    if not root.exists():
        raise CliError(f"no lake at {root} (CURATION_HOME={_data_home()}); run `curation demo` or materialize the lineage first")
    return Lake(str(root))


def cmd_explain(args: argparse.Namespace) -> int:
    """Where a sample came from, its cluster, M, CLIP score, and what each recipe did with it."""
    from curation.evaluate.explain import UID_RE, explain, find_uids, format_explanation

    db = _lake()
    uid = args.uid.strip().lower()
    if not UID_RE.match(uid):
        matches = find_uids(db, uid) if uid and all(c in "0123456789abcdef" for c in uid) else []
        if len(matches) == 1:
            uid = matches[0]
        else:
            hint = f"; uids starting with {uid!r}: {', '.join(matches)}" if matches else ""
            raise CliError(f"uid: got {args.uid!r}; expected 32 hex characters or a unique prefix{hint}")
    e = explain(db, uid)
    if args.json:
        import json

        print(json.dumps(e, indent=2, default=str))
    else:
        print(format_explanation(e))
    return 0 if e["found"] else 1


def cmd_explore(args: argparse.Namespace) -> int:
    """Write the self-contained HTML data explorer."""
    from curation.evaluate.explorer import write_explorer

    if not 0.0 < args.eps < 1.0:
        raise CliError(f"--eps: got {args.eps}; expected 0 < eps < 1")
    db = _lake()
    out = Path(args.out) if args.out else _data_home() / "artifacts" / "reports"
    res = write_explorer(db, _landing(), out, eps=args.eps, seed=args.seed)
    print(f"explorer: {res['path']} ({res['images']} thumbnails, {res['bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    """Launch a backfill of the recipe job over all (or chosen) recipes."""
    recipes = check_recipes(args.recipes) if args.recipes else None
    _quiet_dagster()
    from assets.backfill import backfill_recipes

    backfill_id = backfill_recipes(_instance(), recipes=recipes)
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


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``curation: error: ...``) and exit status 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- evidence (demo, audit)


# The demo's evidence settings (docs/evidence.md: 3 seeds, compute curves, the audit; timed to fit
# `make demo` in 15 minutes on 2 idle cores).
# The recipes the demo trains: one per research result (DBP and its SSP baseline after SemDeDup,
# CLIPCov), their size-matched random controls, full, and full trained with SLIP (Scaling Down
# CLIP's strategy question). semdedup@eps=0.05 and clipscore@0.5 are left to the audit, which
# scores those filters on planted ground truth; `--recipes` runs any others.
DEMO_RECIPES = ["full", "full+slip", "random@0.5", "random@0.5+semdedup", "ssp@0.5", "dbp@0.5", "clipcov@0.5"]
DEMO_SEEDS = [0, 1, 2]
DEMO_SAMPLES_SEEN = 8192
DEMO_SAMPLES_SEEN_MULTIPLES = [0.5]
# the DBP paper's framing: does DBP reach full's accuracy at a fraction of full's compute?
DEMO_CURVE_RECIPES = ["full", "dbp@0.5"]
DEMO_AUDIT_SHARDS = 3
DEMO_AUDIT_RECIPES = ["full", "semdedup@eps=0.05", "clipscore@0.5"]
DEMO_AUDIT_SAMPLES_SEEN = 4096


def demo_recipes() -> list[str]:
    """The partitions ``curation demo`` runs without ``--recipes``: :data:`DEMO_RECIPES` that the
    recipe file declares plus the size-matched control of each pruning recipe among them; every
    partition when the file declares none of them (a user's own recipe file)."""
    from curation.select.controls import control_map

    names = recipe_names()
    chosen = [r for r in DEMO_RECIPES if r in names]
    if not chosen:
        return recipe_partition_keys()
    valid = set(recipe_partition_keys())  # controls may be turned off (CURATION_CONTROLS=off)
    for target, control in control_map().items():
        if target in chosen and control not in chosen and control in valid:
            chosen.append(control)
    return chosen


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


def with_evidence(run_config: dict, args: argparse.Namespace, recipe: str) -> dict:
    """``run_config`` with the demo's evidence settings merged into trained_checkpoints' config
    (a value the YAML config sets explicitly wins)."""
    import copy

    out = copy.deepcopy(run_config)
    cfg = out.setdefault("ops", {}).setdefault("trained_checkpoints", {}).setdefault("config", {})
    for k, v in evidence_training_config(args, recipe).items():
        cfg.setdefault(k, v)
    return out


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
        kept = db.partition_counts("subsets")
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

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="curation",
        description="Curate image-caption data for CLIP training: SemDeDup, density-based pruning, "
        "CLIPCov; train and evaluate CLIP models on each subset, and look at what each step kept and removed.",
        epilog=ENV_HELP,
        formatter_class=fmt,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_library_commands(sub)

    p = sub.add_parser("demo", help="build the default dataset if missing and run the whole lineage", epilog=ENV_HELP, formatter_class=fmt)
    p.add_argument("--recipes", nargs="*", help=f"recipes to run (default: {DEMO_RECIPES} and their size-matched controls; "
                   "all recipes of a recipe file that declares none of them)")
    p.add_argument("--limit", type=int, default=None, help="build the dataset from at most N concepts")
    p.add_argument("--rebuild", action="store_true", help="rebuild the dataset even if shards exist")
    p.add_argument("--samples-seen", type=int, default=None,
                   help=f"samples seen per training run (filter model and every recipe; default: {DEMO_SAMPLES_SEEN} per "
                   "recipe, the training config's for the filter model)")
    p.add_argument("--config", help="run config YAML (ops: {asset: {config: ...}}), e.g. seeds and training settings")
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

    p = sub.add_parser("audit", help="plant labelled noise in a copy of a landing dataset, curate it, score every filter",
                       epilog=ENV_HELP, formatter_class=fmt)
    p.add_argument("--dataset", help="landing dataset to copy (default: the first one)")
    p.add_argument("--shards", type=int, default=None, help="copy only the first N shards (default: all)")
    p.add_argument("--recipes", nargs="*", help="recipes to run on the noisy copy (default: all in the recipe config)")
    p.add_argument("--samples-seen", type=int, default=None, help="samples seen per model (default: the training config's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted noise")
    p.add_argument("--home", help="data home of the audit copy (default: $CURATION_HOME/audit)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "materialize", help="materialize assets in process (as the named stage jobs)", epilog=ENV_HELP, formatter_class=fmt,
        description=f"assets: {', '.join(ALL_ASSETS)}. Shard assets ({', '.join(SHARD_ASSETS)}) need --partition "
        f"<dataset>-<stem> (registered on the fly); recipe assets ({', '.join(RECIPE_ASSETS)}) need --partition <recipe>.",
    )
    p.add_argument("assets", nargs="+", help="asset keys, e.g. samples embeddings")
    p.add_argument("--partition", help="partition key (a shard key or a recipe name)")
    p.add_argument("--config", help="run config YAML (ops: {asset: {config: ...}})")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("maintain", help="lake maintenance now: compact the cluster layout, vacuum old files",
                       epilog=ENV_HELP, formatter_class=fmt,
                       description="Runs lake_maintenance_job (what the daily maintenance_schedule runs) in process: "
                       "compacts the pool_by_cluster buckets holding several files, then deletes the files no commit "
                       "references that are older than the retention (docs/operations.md).")
    p.add_argument("--dry-run", action="store_true", help="report what would be compacted and freed; change nothing")
    p.add_argument("--retention-hours", type=int, default=168,
                   help="vacuum only unreferenced files older than this (default 168, Delta's week)")
    p.add_argument("--compact-min-files", type=int, default=None,
                   help="compact the buckets holding at least this many files (default 2)")
    p.add_argument("--no-compact", action="store_true", help="vacuum only")
    p.add_argument("--tables", nargs="*", help="tables to vacuum (default: all)")
    p.set_defaults(func=cmd_maintain)

    p = sub.add_parser("shards", help="register landed shards as partitions, or list them")
    ssub = p.add_subparsers(dest="shards_command", required=True, parser_class=_Parser)
    r = ssub.add_parser("register", help="add every landed shard (landing/<dataset>/<stem>.tar) as a `shards` partition")
    r.add_argument("--dataset", help="only this dataset's shards")
    r.set_defaults(func=cmd_shards_register)
    r = ssub.add_parser("list", help="landed shards and whether they are registered")
    r.set_defaults(func=cmd_shards_list)

    p = sub.add_parser("explain", help="where a sample came from and what every recipe did with it")
    p.add_argument("uid", help="the sample uid (32 hex chars, or a unique prefix)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("explore", help="write the HTML data explorer (clusters, duplicates, kept/removed, quarantine)")
    p.add_argument("--eps", type=float, default=0.05, help="SemDeDup eps of the duplicate groups shown (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples shown")
    p.add_argument("--out", help="directory (default: $CURATION_HOME/artifacts/reports)")
    p.set_defaults(func=cmd_explore)

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
    logging.basicConfig(  # libraries (open_clip, Dagster) at WARNING; the platform's own lines at INFO
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("curation").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for name in ("faiss.loader", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"curation: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"curation: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
