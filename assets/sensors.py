"""The landing-zone sensor: new shards become partitions and runs of ``shard_ingest_job``.

Each tick scans ``landing/<dataset>/<stem>.tar`` (:func:`curation.ingest.shards.find_shards`) and
compares every file's ``(size, mtime_ns)`` with the cursor (a JSON map ``{shard_key:
"size:mtime_ns"}``). A shard key the instance does not know yet is added to the ``shards``
dynamic partitions; every new or changed file gets a run request whose ``run_key`` is
``"<shard_key>:<size>:<mtime_ns>"``, so the same file state is never ingested twice and a
replaced file is. A shard whose ``samples`` partition is already materialized when the sensor
first meets it (e.g. by ``curation demo``) is recorded without a run. Ticks that find nothing
say why (``SkipReason``).

The automation chain after ingest (every ``RunRequest`` has a deterministic ``run_key``; a
*wave* tag ties the runs of one curation pass together):

1. ``curate_after_ingest``: when ``shard_ingest_job`` runs have succeeded since its cursor
   and none is still queued or running (a dropped dataset is many shard runs), request one
   ``pool_curation_job`` run with mode ``auto``. run_key ``ingest:<last run id>``.
2. ``recipes_after_pool_curation`` (run status sensor): when a ``pool_curation_job`` run
   succeeds, request one ``recipe_job`` run per recipe partition (run_key ``<wave>:<recipe>``).
   Recipes therefore always read the *new* clusters and scores: ordering is enforced by the
   chain, not by luck of the run queue.
3. ``report_after_recipes`` (run status sensor): when a ``recipe_job`` run succeeds and the
   latest run of every recipe of its wave (the sensor's wave, or a UI backfill) has
   succeeded, request ``report_job`` (run_key ``<wave>:report``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import dagster as dg
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    RunsFilter,
    RunStatusSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_status_sensor,
    sensor,
)
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from assets.jobs import pool_curation_job, pool_run_request, recipe_job, recipe_run_requests, report_job, shard_ingest_job
from assets.partitions import SHARDS, recipe_partitions, shard_partitions
from assets.settings import automation_status
from assets.stages import BACKFILL_TAG, PARTITION_TAG, TRIGGER_TAG, WAVE_TAG
from curation.ingest.shards import find_shards
from resources import DatasetsResource

log = logging.getLogger(__name__)

INGEST_JOB = shard_ingest_job.name  # the landing sensor's per-shard job


def _file_state(path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


@dg.sensor(
    job=shard_ingest_job,
    minimum_interval_seconds=30,
    default_status=automation_status(),
    description="Watches the landing zone; adds a `shards` partition per new shard and "
    "requests one shard_ingest_job run per new or changed shard file.",
)
def landing_sensor(context: dg.SensorEvaluationContext, datasets: DatasetsResource):
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    shards = find_shards(datasets.landing)
    if not shards:
        return dg.SkipReason(f"no shards in the landing zone {datasets.landing} (expected <dataset>/<stem>.tar)")

    registered = set(context.instance.get_dynamic_partitions(SHARDS))
    materialized = context.instance.get_materialized_partitions(dg.AssetKey("samples")) if registered else set()
    new_keys: list[str] = []
    requests: list[dg.RunRequest] = []
    already_ingested: list[str] = []
    cursor = dict(known)
    for key, path in shards.items():
        try:
            state = _file_state(path)
        except FileNotFoundError:  # removed between the scan and the stat
            continue
        if known.get(key) == state:
            continue
        cursor[key] = state
        if key not in registered:
            new_keys.append(key)
        elif key not in known and key in materialized:
            already_ingested.append(key)
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{key}:{state}",
                partition_key=key,
                tags={"curation/shard": key, "curation/trigger": "landing_sensor"},
            )
        )
    gone = sorted(set(known) - set(shards))
    for key in gone:
        cursor.pop(key, None)
    if gone:
        context.log.info("shards no longer in the landing zone (partitions kept): %s", gone)
    if already_ingested:
        context.log.info("%d shards were already ingested before the sensor saw them", len(already_ingested))
    new_cursor = json.dumps(cursor, sort_keys=True, separators=(",", ":"))
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(
                f"no new or changed shards among {len(shards)} in {datasets.landing}"
                + (f" ({len(already_ingested)} already ingested)" if already_ingested else "")
            ),
            cursor=new_cursor,
        )
    context.log.info("requesting %d runs (%d new partitions)", len(requests), len(new_keys))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[shard_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=new_cursor,
    )


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


AUTOMATION_SENSORS = [curate_after_ingest, recipes_after_pool_curation, report_after_recipes]
SENSORS = [landing_sensor, *AUTOMATION_SENSORS]
