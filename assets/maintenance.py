"""Lake maintenance as a job and a schedule: compact the cluster layout, vacuum old files.

* ``lake_maintenance_job``: one op, ``maintain_lake``
  (:func:`curation.select.maintenance.maintain_lake`): compacts the ``pool_by_cluster``
  buckets holding at least ``compact_min_files`` files, then deletes from every table the files
  no commit references that are older than ``retention_hours``. Its output metadata lists the
  buckets compacted, the layout's files before and after, and the files and bytes freed per
  table; it also records an observation of ``concept_clusters`` (the layout's writer) with the
  layout's file count, so the asset's page shows it between curations.
* ``maintenance_schedule`` (:mod:`assets.schedules`) requests it daily.

A compaction rewrites buckets that ``concept_clusters`` may be appending to or deleting from:
the job and ``pool_curation_job`` carry the ``curation/layout`` tag, which the shipped instance
(``dagster_home/dagster.yaml``) limits to one run at a time, and the op also skips the
compaction (not the vacuum) while a ``pool_curation_job`` run is queued or in progress on an
instance without that limit. While any other run is queued or in progress, the vacuum keeps
files younger than an hour whatever ``retention_hours`` says (they may belong to its writes).
"""

# no ``from __future__ import annotations``: Dagster resolves the op's config annotation at definition

import dagster as dg
from dagster import RunsFilter
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from assets.jobs import pool_curation_job
from assets.run_health import run_worker_dead
from assets.stages import LAYOUT_TAG, STAGE_TAG
from curation.select.maintenance import maintain_lake
from curation.storage.lake import VACUUM_RETENTION_HOURS
from resources import LakeResource


class MaintenanceConfig(dg.Config):
    """``compact_min_files``: compact the layout buckets holding at least this many data files
    (every incremental update appends one to each bucket it touches); None: never.
    ``retention_hours``: vacuum only unreferenced files older than this (Delta's default, a
    week; shorter frees a rebuild's or compaction's old files sooner, but a run still reading
    an older table version loses them). ``tables``: the tables to vacuum (empty: all).
    ``dry_run``: report what would be compacted and freed, change nothing."""

    compact_min_files: int | None = 2
    retention_hours: int = VACUUM_RETENTION_HOURS
    tables: list[str] = []
    dry_run: bool = False


#: while other runs write, a vacuum keeps at least this much: files that young may belong to a
#: write in flight (an ingest, a layout update) whose commit would then name deleted files
MIN_RETENTION_WHILE_RUNNING_HOURS = 1


def _running(instance: dg.DagsterInstance, own_run_id: str, job_name: str | None = None) -> bool:
    """Whether another run (of ``job_name``, or of any job) is queued or in progress; a STARTED
    run whose worker process is gone (killed; run monitoring has not marked it FAILED yet)
    writes nothing and does not count."""
    records = instance.get_run_records(RunsFilter(job_name=job_name, statuses=list(IN_PROGRESS_RUN_STATUSES)))
    return any(r.dagster_run.run_id != own_run_id and not run_worker_dead(instance, r.dagster_run) for r in records)


@dg.op(
    name="maintain_lake",
    description="Compact the pool_by_cluster layout, then vacuum unreferenced files older than the retention.",
    out=dg.Out(dict, description="what was compacted and freed"),
)
def maintain_lake_op(context: dg.OpExecutionContext, config: MaintenanceConfig, lake: LakeResource):
    db = lake.lake()
    skip = ""
    if config.compact_min_files is not None and _running(context.instance, context.run_id, pool_curation_job.name):
        skip = "a pool_curation_job run is queued or in progress (it writes the layout)"
        context.log.warning(f"compaction skipped: {skip}; the vacuum still runs")
    retention = config.retention_hours
    if retention < MIN_RETENTION_WHILE_RUNNING_HOURS and _running(context.instance, context.run_id):
        retention = MIN_RETENTION_WHILE_RUNNING_HOURS
        context.log.warning(f"other runs are in progress: the vacuum keeps files younger than {retention} h "
                            f"(asked: {config.retention_hours} h), they may belong to a write in flight")
    rep = maintain_lake(db, config.compact_min_files, retention, config.tables or None,
                        config.dry_run, skip_compaction=skip)
    freed = {v.table: v.files for v in rep.vacuums if v.files}
    metadata = {
        "dry_run": rep.dry_run,
        "buckets_compacted": len(rep.compacted_buckets),
        "compaction_skipped": rep.compaction_skipped,
        "files_vacuumed": rep.files_vacuumed,
        "files_vacuumed_per_table": dg.MetadataValue.json(freed),
        "retention_hours": retention,
        "seconds": round(rep.seconds, 3),
    }
    if rep.bytes_freed is not None:
        metadata["mib_freed"] = round(rep.bytes_freed / 2**20, 3)
    if rep.layout_files_before is not None:
        metadata["layout_files_before"] = rep.layout_files_before
        metadata["layout_files_after"] = rep.layout_files_after
        if not rep.dry_run:
            context.log_event(dg.AssetObservation(
                asset_key="concept_clusters",
                metadata={"layout_files": rep.layout_files_after, "buckets_compacted": len(rep.compacted_buckets)}))
    summary = {
        "compacted_buckets": rep.compacted_buckets,
        "layout_files": [rep.layout_files_before, rep.layout_files_after],
        "files_vacuumed": freed,
        "bytes_freed": rep.bytes_freed,
        "compaction_skipped": rep.compaction_skipped,
        "retention_hours": retention,
        "dry_run": rep.dry_run,
    }
    return dg.Output(summary, metadata=metadata)


@dg.job(
    name="lake_maintenance_job",
    tags={STAGE_TAG: "maintenance", LAYOUT_TAG: "write"},
    description="Compact the cluster layout and vacuum the files rewrites left behind (lake maintenance).",
)
def lake_maintenance_job():
    maintain_lake_op()
