"""Jobs and the automation that chains them: ingest -> pool curation -> recipes -> report.

Jobs (asset jobs over the lineage; partitioned and unpartitioned assets cannot share a job):

* ``pool_curation_job``  concept_clusters, dedup_scores, complexity_scores, filter_model
  (unpartitioned; its run config sets ``concept_clusters``' mode: ``auto`` assigns new
  shards to the existing centroids, ``retrain`` re-clusters).
* ``recipe_job``         pruned_subsets, trained_checkpoints, eval_reports, partitioned by
  recipe: one run per recipe, and the job a UI backfill over recipes launches.
* ``report_job``         curation_report (all recipes side by side).

The chain (every ``RunRequest`` has a deterministic ``run_key``; a *wave* tag ties the runs
of one curation pass together):

1. ``curate_after_ingest`` (sensor): when ``shard_ingest_job`` runs have succeeded since its
   cursor and none is still queued or running (a dropped dataset is many shard runs), request
   one ``pool_curation_job`` run with mode ``auto``. run_key ``ingest:<last run id>``.
2. ``recurate_schedule`` (schedule, cron from ``CURATION_RECURATE_CRON``, default weekly):
   request a ``pool_curation_job`` run with mode ``retrain``. run_key
   ``recurate:<scheduled time>``.
3. ``recipes_after_pool_curation`` (run status sensor): when a ``pool_curation_job`` run
   succeeds, request one ``recipe_job`` run per recipe partition (run_key ``<wave>:<recipe>``).
   Recipes therefore always read the *new* clusters and scores: ordering is enforced by the
   chain, not by luck of the run queue.
4. ``report_after_recipes`` (run status sensor): when a ``recipe_job`` run succeeds and the
   latest run of every recipe of its wave (the sensor's wave, or a UI backfill) has succeeded,
   request ``report_job`` (run_key ``<wave>:report``).

``backfill_recipes(instance, recipes=None)`` submits an asset backfill of the recipe assets
over recipes plus ``curation_report`` (run by the daemon: ``curation ui`` / ``dagster dev``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    RunStatusSensorContext,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    run_status_sensor,
    schedule,
    sensor,
)
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from assets.jobs import shard_ingest_job
from assets.partitions import recipe_partitions
from assets.settings import automation_status

log = logging.getLogger(__name__)

# Asset keys by stage (strings: this module needs no asset definitions to build its jobs).
POOL_ASSETS = ("concept_clusters", "dedup_scores", "complexity_scores", "filter_model")
RECIPE_ASSETS = ("pruned_subsets", "trained_checkpoints", "eval_reports")
REPORT_ASSETS = ("curation_report",)

INGEST_JOB = shard_ingest_job.name  # the landing sensor's per-shard job (assets/jobs.py)

# Run tags.
WAVE_TAG = "curation/wave"  # ties the runs of one curation pass together
TRIGGER_TAG = "curation/trigger"  # ingest | schedule | backfill
STAGE_TAG = "curation/stage"  # pool | recipe | report: for tag_concurrency_limits of the run queue
MODE_TAG = "curation/cluster_mode"
PARTITION_TAG = "dagster/partition"
BACKFILL_TAG = "dagster/backfill"

CLUSTER_MODES = ("auto", "retrain", "assign")  # concept_clusters' ConceptClustersConfig.mode
DEFAULT_RECURATE_CRON = "0 3 * * 0"  # Sundays 03:00


def recurate_cron() -> str:
    """Cron of the re-curation schedule: ``CURATION_RECURATE_CRON`` (default weekly)."""
    return os.environ.get("CURATION_RECURATE_CRON", DEFAULT_RECURATE_CRON)


def recurate_timezone() -> str:
    """Timezone of the schedule: ``CURATION_RECURATE_TZ`` (default UTC)."""
    return os.environ.get("CURATION_RECURATE_TZ", "UTC")


def pool_run_config(mode: str) -> dict:
    """Run config of ``pool_curation_job`` setting ``concept_clusters``' mode.

    ``auto``: assign new samples to the stored centroids (train only if none exist);
    ``retrain``: re-run k-means on the whole pool; ``assign``: assign only (fails without
    centroids).
    """
    if mode not in CLUSTER_MODES:
        raise ValueError(f"mode: got {mode!r}; expected one of {CLUSTER_MODES}")
    return {"ops": {"concept_clusters": {"config": {"mode": mode}}}}


# --------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------

pool_curation_job = define_asset_job(
    "pool_curation_job",
    selection=AssetSelection.assets(*POOL_ASSETS),
    tags={STAGE_TAG: "pool"},
    description="Pool-wide curation: cluster (auto-assign or retrain), dedup and complexity scores, filter model.",
)

recipe_job = define_asset_job(
    "recipe_job",
    selection=AssetSelection.assets(*RECIPE_ASSETS),
    partitions_def=recipe_partitions,
    tags={STAGE_TAG: "recipe"},
    description="Per recipe: prune the pool, train a CLIP on the subset, evaluate it. Backfill it over recipes.",
)

report_job = define_asset_job(
    "report_job",
    selection=AssetSelection.assets(*REPORT_ASSETS),
    tags={STAGE_TAG: "report"},
    description="The side-by-side curation report over all recipes.",
)

JOBS = [pool_curation_job, recipe_job, report_job]


def _valid_recipes(recipes: Iterable[str] | None) -> list[str]:
    known = recipe_partitions.get_partition_keys()
    if recipes is None:
        return list(known)
    recipes = list(recipes)
    unknown = [r for r in recipes if r not in known]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; expected some of {known}")
    return recipes


def pool_run_request(run_key: str, mode: str, trigger: str) -> RunRequest:
    """A ``pool_curation_job`` run that starts wave ``run_key``."""
    return RunRequest(
        run_key=run_key,
        job_name=pool_curation_job.name,
        run_config=pool_run_config(mode),
        tags={WAVE_TAG: run_key, TRIGGER_TAG: trigger, MODE_TAG: mode},
    )


def recipe_run_requests(wave: str, recipes: Iterable[str] | None = None, trigger: str = "") -> list[RunRequest]:
    """One ``recipe_job`` run per recipe partition of ``wave`` (run_key ``<wave>:<recipe>``)."""
    tags = {WAVE_TAG: wave}
    if trigger:
        tags[TRIGGER_TAG] = trigger
    return [
        RunRequest(run_key=f"{wave}:{r}", job_name=recipe_job.name, partition_key=r, tags=dict(tags))
        for r in _valid_recipes(recipes)
    ]


# --------------------------------------------------------------------------------------
# Schedule: periodic re-curation (re-cluster, re-score, re-prune, retrain, re-evaluate)
# --------------------------------------------------------------------------------------


@schedule(
    name="recurate_schedule",
    cron_schedule=recurate_cron(),
    execution_timezone=recurate_timezone(),
    job=pool_curation_job,
    default_status=DefaultScheduleStatus.STOPPED,
    description="Re-cluster the whole pool (concept_clusters mode=retrain); the chain sensors then "
    "re-prune, retrain and re-evaluate every recipe and rebuild the report.",
)
def recurate_schedule(context: ScheduleEvaluationContext):
    scheduled = context.scheduled_execution_time or datetime.now(timezone.utc)
    run_key = f"recurate:{scheduled.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    return pool_run_request(run_key, mode="retrain", trigger="schedule")


# --------------------------------------------------------------------------------------
# Sensors
# --------------------------------------------------------------------------------------


@sensor(
    name="curate_after_ingest",
    job=pool_curation_job,
    minimum_interval_seconds=30,
    default_status=automation_status(),
    description="After shard_ingest_job runs succeed (and none is still queued/running), curate the "
    "pool: new shards are assigned to the existing concept centroids (mode=auto).",
)
def curate_after_ingest(context: SensorEvaluationContext):
    """Cursor: the update timestamp (float seconds) of the last ingest success consumed."""
    instance = context.instance
    after = float(context.cursor) if context.cursor else 0.0
    records = instance.get_run_records(
        filters=RunsFilter(
            job_name=INGEST_JOB,
            statuses=[DagsterRunStatus.SUCCESS],
            updated_after=datetime.fromtimestamp(after, tz=timezone.utc),
        ),
        order_by="update_timestamp",
        ascending=True,
    )
    new = [r for r in records if r.update_timestamp.timestamp() > after]
    if not new:
        return SkipReason(f"no {INGEST_JOB} run succeeded since the cursor ({after:.3f})")
    busy = instance.get_runs_count(RunsFilter(job_name=INGEST_JOB, statuses=list(IN_PROGRESS_RUN_STATUSES)))
    if busy:
        return SkipReason(f"{len(new)} ingest run(s) succeeded; waiting for {busy} ingest run(s) still queued or running")
    last = new[-1]
    context.update_cursor(repr(last.update_timestamp.timestamp()))
    context.log.info("%d ingest run(s) succeeded; requesting pool curation (mode=auto)", len(new))
    return pool_run_request(f"ingest:{last.dagster_run.run_id}", mode="auto", trigger="ingest")


@run_status_sensor(
    name="recipes_after_pool_curation",
    run_status=DagsterRunStatus.SUCCESS,
    monitored_jobs=[pool_curation_job],
    request_job=recipe_job,
    default_status=automation_status(),
    description="When pool curation succeeds, run every recipe (prune, train, evaluate) on the new scores.",
)
def recipes_after_pool_curation(context: RunStatusSensorContext):
    run = context.dagster_run
    wave = run.tags.get(WAVE_TAG) or f"run:{run.run_id}"
    trigger = run.tags.get(TRIGGER_TAG, "manual")
    return recipe_run_requests(wave, trigger=trigger)


def _wave_of(run) -> tuple[str | None, dict]:
    """The wave of a recipe run and the run filter tags that select its siblings."""
    if WAVE_TAG in run.tags:
        return run.tags[WAVE_TAG], {WAVE_TAG: run.tags[WAVE_TAG]}
    if BACKFILL_TAG in run.tags:
        return f"backfill:{run.tags[BACKFILL_TAG]}", {BACKFILL_TAG: run.tags[BACKFILL_TAG]}
    return None, {}


def wave_status(instance: DagsterInstance, run) -> tuple[str | None, list[str], dict[str, DagsterRunStatus]]:
    """``(wave, expected recipes, status of the latest run per recipe)`` for a recipe run."""
    wave, tags = _wave_of(run)
    if wave is None:
        return None, [], {}
    if BACKFILL_TAG in tags:
        backfill = instance.get_backfill(tags[BACKFILL_TAG])
        expected = list(backfill.partition_names or []) if backfill is not None else []
    else:
        expected = recipe_partitions.get_partition_keys()
    latest: dict[str, DagsterRunStatus] = {}
    # newest first: the first run seen per partition is its latest attempt (re-executions count)
    for r in instance.get_runs(filters=RunsFilter(job_name=recipe_job.name, tags=tags)):
        part = r.tags.get(PARTITION_TAG)
        if part is not None and part not in latest:
            latest[part] = r.status
    return wave, expected, latest


@run_status_sensor(
    name="report_after_recipes",
    run_status=DagsterRunStatus.SUCCESS,
    monitored_jobs=[recipe_job],
    request_job=report_job,
    default_status=automation_status(),
    description="When every recipe run of a wave (or of a recipe backfill) has succeeded, rebuild the report.",
)
def report_after_recipes(context: RunStatusSensorContext):
    wave, expected, latest = wave_status(context.instance, context.dagster_run)
    if wave is None:
        return SkipReason("a single recipe run outside any wave or backfill: materialize curation_report by hand")
    missing = [r for r in expected if latest.get(r) != DagsterRunStatus.SUCCESS]
    if missing:
        return SkipReason(f"wave {wave}: waiting for {len(missing)} recipe(s): {missing}")
    return RunRequest(run_key=f"{wave}:report", tags={WAVE_TAG: wave})


SCHEDULES = [recurate_schedule]
SENSORS = [curate_after_ingest, recipes_after_pool_curation, report_after_recipes]


# --------------------------------------------------------------------------------------
# Backfill from the CLI
# --------------------------------------------------------------------------------------


MAX_TITLE = 100  # Dagster rejects longer backfill titles


def backfill_title(recipes: Sequence[str]) -> str:
    """``"recipes: a, b, c"``, or ``"recipes: a, b, ... (N recipes)"`` within Dagster's 100 characters."""
    title = f"recipes: {', '.join(recipes)}"
    if len(title) <= MAX_TITLE:
        return title
    shown: list[str] = []
    for r in recipes:
        candidate = f"recipes: {', '.join([*shown, r])}, ... ({len(recipes)} recipes)"
        if len(candidate) > MAX_TITLE:
            break
        shown.append(r)
    return f"recipes: {', '.join(shown)}, ... ({len(recipes)} recipes)" if shown else f"{len(recipes)} recipes"


def backfill_recipes(
    instance: DagsterInstance,
    recipes: Sequence[str] | None = None,
    defs=None,
    include_report: bool = True,
    tags: dict[str, str] | None = None,
) -> str:
    """Submit an asset backfill of the recipe assets over ``recipes`` (default: all).

    The backfill targets pruned_subsets, trained_checkpoints and eval_reports for each recipe
    partition and, with ``include_report``, curation_report after them. The daemon of the
    instance (``curation ui`` / ``dagster dev``) launches its runs; it shows in the UI's
    Backfills tab like one launched there.

    Returns:
        The backfill id.
    """
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._time import get_current_timestamp

    if defs is None:
        from assets.definitions import defs as _defs

        defs = _defs
    partition_names = _valid_recipes(recipes)
    selection = [AssetKey(k) for k in RECIPE_ASSETS + (REPORT_ASSETS if include_report else ())]
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=defs.resolve_asset_graph(),
        partition_names=partition_names,
        asset_selection=selection,
        backfill_timestamp=get_current_timestamp(),
        tags={TRIGGER_TAG: "backfill", **(tags or {})},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=backfill_title(partition_names),
        description="backfill of the recipe assets (and the report) over recipes: " + ", ".join(partition_names),
        run_config=None,
    )
    instance.add_backfill(backfill)
    log.info("submitted backfill %s over %d recipe(s)", backfill.backfill_id, len(partition_names))
    return backfill.backfill_id
