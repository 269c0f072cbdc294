"""The landing-zone sensor: new shards become partitions and runs of ``shard_ingest_job``.

Each tick scans ``landing/<dataset>/<stem>.tar`` (:func:`curation.ingest.shards.find_shards`) and
detects changes by CONTENT: the cursor holds each file's sha256 (cached under its size, mtime,
ctime and inode, and re-verified by a rolling scrub whatever the stat says; see
:func:`landing_sensor`). A shard key the instance does not know yet is added to the ``shards``
dynamic partitions; every new file and every file whose bytes changed gets a run request whose
``run_key`` is ``"<shard_key>:<sha256>:<generation>"``, so the same bytes are never ingested
twice and replaced bytes are, even at the same size and mtime. A shard deleted after ingest gets
a run that tombstones its rows (docs/reliability.md). A shard whose ``samples`` partition is already materialized when the sensor
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

import hashlib
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
from assets.run_health import run_worker_dead
from assets.partitions import SHARDS, recipe_partitions, shard_partitions
from assets.settings import automation_status
from assets.stages import BACKFILL_TAG, PARTITION_TAG, TRIGGER_TAG, WAVE_TAG
from curation.ingest.shards import find_shards
from resources import DatasetsResource

log = logging.getLogger(__name__)

INGEST_JOB = shard_ingest_job.name  # the landing sensor's per-shard job


#: bytes of unchanged-looking shards re-hashed per tick (the scrub): a file rewritten in place
#: with its size and mtime restored is caught within ``total bytes / SCRUB_BYTES`` ticks even
#: where ctime cannot be trusted (some network file systems, restored backups)
SCRUB_BYTES = 1 << 30
CURSOR_VERSION = 2


def file_sha256(path, block: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _file_sig(st) -> str:
    """What the stat says: size, mtime, ctime, inode. A cache key for the hash, not a verdict."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _load_cursor(raw: str | None) -> tuple[dict[str, dict], int]:
    """``({shard_key: {"sig", "sha", "at", "gen"}}, tick)`` from the cursor (v1 cursors migrate)."""
    if not raw:
        return {}, 0
    data = json.loads(raw)
    if isinstance(data, dict) and data.get("v") == CURSOR_VERSION:
        return data["files"], int(data["tick"])
    # v1: {key: "size:mtime_ns"}: no hash known; adopt the current hash if the file looks the same
    return {k: {"sig": None, "v1": v, "sha": None, "at": 0, "gen": 0} for k, v in data.items()}, 0


@dg.sensor(
    job=shard_ingest_job,
    minimum_interval_seconds=30,
    default_status=automation_status(),
    description="Watches the landing zone; adds a `shards` partition per new shard and requests one "
    "shard_ingest_job run per new shard, per shard whose CONTENT changed (sha256), and per shard "
    "deleted after ingest (its rows are tombstoned).",
)
def landing_sensor(context: dg.SensorEvaluationContext, datasets: DatasetsResource):
    """Content-addressed change detection.

    The cursor keeps, per shard, the sha256 of its bytes, the stat signature (size, mtime,
    ctime, inode) it was computed under, and the tick it was last verified. A file is
    re-hashed when its signature changed, and, whatever the signature says, the least
    recently verified files are re-hashed up to :data:`SCRUB_BYTES` per tick. A run is
    requested only when the hash differs from the last ingested one (run_key
    ``<shard>:<sha256>:<generation>``): touching a file re-ingests nothing, replacing its
    bytes (even at the same size and mtime) re-ingests it. A shard that disappears after it
    was ingested gets a run that tombstones its rows (``samples`` empties the partition and
    records every key as ``shard_deleted`` in ``quarantine``); the generation counter lets a
    shard that comes back with the same bytes be ingested again.
    """
    files, tick = _load_cursor(context.cursor)
    tick += 1
    shards = find_shards(datasets.landing)
    if not shards and not any(e.get("sha") for e in files.values()):
        return dg.SkipReason(f"no shards in the landing zone {datasets.landing} (expected <dataset>/<stem>.tar)")

    registered = set(context.instance.get_dynamic_partitions(SHARDS))
    materialized = context.instance.get_materialized_partitions(dg.AssetKey("samples")) if registered else set()
    new_keys: list[str] = []
    requests: list[dg.RunRequest] = []
    already_ingested: list[str] = []
    scrub: list[tuple[int, str]] = []
    stats = {}
    for key, path in shards.items():
        try:
            st = path.stat()
        except FileNotFoundError:  # removed between the scan and the stat
            continue
        stats[key] = st
        entry = files.get(key)
        if entry is not None and entry.get("sha") and entry.get("sig") == _file_sig(st):
            scrub.append((int(entry.get("at", 0)), key))
    # the scrub: the least recently verified unchanged-looking files, within the byte budget
    verify = set()
    budget = SCRUB_BYTES
    for _, key in sorted(scrub):
        size = stats[key].st_size
        if size > budget and verify:
            break
        verify.add(key)
        budget -= size
    for key, st in stats.items():
        path = shards[key]
        entry = files.get(key) or {"sig": None, "sha": None, "at": 0, "gen": 0}
        sig = _file_sig(st)
        if entry.get("sig") == sig and entry.get("sha") and key not in verify:
            continue
        try:
            sha = file_sha256(path)
        except FileNotFoundError:
            continue
        old_sha = entry.get("sha")
        if old_sha is None and entry.get("v1") == f"{st.st_size}:{st.st_mtime_ns}":
            old_sha = sha  # migrated v1 entry, file unchanged since: nothing to do
        files[key] = {"sig": sig, "sha": sha, "at": tick, "gen": int(entry.get("gen", 0))}
        if old_sha == sha:
            continue
        if old_sha is not None and entry.get("sig") == sig:
            context.log.warning(
                "shard %s: content changed (sha256 %s -> %s) although size, mtime, ctime and inode did not",
                key, old_sha[:12], sha[:12],
            )
        if key not in registered:
            new_keys.append(key)
        elif old_sha is None and not entry.get("deleted") and key in materialized:
            already_ingested.append(key)
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{key}:{sha}:{files[key]['gen']}",
                partition_key=key,
                tags={"curation/shard": key, "curation/trigger": "landing_sensor"},
            )
        )
    # shards that were ingested and are gone now: one tombstone run each
    gone = sorted(k for k, e in files.items() if k not in shards and e.get("sha"))
    for key in gone:
        entry = files[key]
        gen = int(entry.get("gen", 0)) + 1
        files[key] = {"sig": None, "sha": None, "at": tick, "gen": gen, "deleted": True}
        if key in registered:
            requests.append(
                dg.RunRequest(
                    run_key=f"{key}:deleted:{gen}",
                    partition_key=key,
                    tags={"curation/shard": key, "curation/trigger": "landing_sensor_deleted"},
                )
            )
    if gone:
        context.log.warning("shards deleted from the landing zone (their rows will be tombstoned): %s", gone)
    if already_ingested:
        context.log.info("%d shards were already ingested before the sensor saw them", len(already_ingested))
    new_cursor = json.dumps({"v": CURSOR_VERSION, "tick": tick, "files": files}, sort_keys=True, separators=(",", ":"))
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(
                f"no new or changed shards among {len(shards)} in {datasets.landing}"
                f" ({len(verify)} re-verified by content)"
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
    in_progress = instance.get_runs(RunsFilter(job_name=INGEST_JOB, statuses=list(IN_PROGRESS_RUN_STATUSES)))
    # never wait on a run whose worker was killed (run monitoring marks it FAILED; this guard
    # holds even where the daemon's monitoring is off)
    dead = [r.run_id for r in in_progress if run_worker_dead(instance, r)]
    if dead:
        context.log.warning("ingest run(s) %s are STARTED but their worker process is gone; not waiting on them", dead)
    busy = len(in_progress) - len(dead)
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
