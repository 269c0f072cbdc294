"""Schedules: periodic re-curation (re-cluster, re-score, re-prune, retrain, re-evaluate).

``recurate_schedule`` (cron from ``CURATION_RECURATE_CRON``, default weekly; stopped by
default) requests a ``pool_curation_job`` run with mode ``retrain``, run_key
``recurate:<scheduled time>``; the chain sensors (:mod:`assets.sensors`) do the rest.

``maintenance_schedule`` (cron from ``CURATION_MAINTENANCE_CRON``, default daily 04:00; on with
the automation, ``CURATION_AUTOMATION``) requests ``lake_maintenance_job``
(:mod:`assets.maintenance`: compact the cluster layout, vacuum old files), run_key
``maintenance:<scheduled time>``.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from dagster import DefaultScheduleStatus, DefaultSensorStatus, RunRequest, ScheduleEvaluationContext, schedule

from assets.jobs import pool_curation_job, pool_run_request
from assets.maintenance import lake_maintenance_job
from assets.settings import automation_status
from assets.stages import TRIGGER_TAG

DEFAULT_RECURATE_CRON = "0 3 * * 0"  # Sundays 03:00
DEFAULT_MAINTENANCE_CRON = "0 4 * * *"  # daily 04:00


def recurate_cron() -> str:
    """Cron of the re-curation schedule: ``CURATION_RECURATE_CRON`` (default weekly)."""
    return os.environ.get("CURATION_RECURATE_CRON", DEFAULT_RECURATE_CRON)


def maintenance_cron() -> str:
    """Cron of the maintenance schedule: ``CURATION_MAINTENANCE_CRON`` (default daily 04:00)."""
    return os.environ.get("CURATION_MAINTENANCE_CRON", DEFAULT_MAINTENANCE_CRON)


def recurate_timezone() -> str:
    """Timezone of the schedule: ``CURATION_RECURATE_TZ`` (default UTC)."""
    return os.environ.get("CURATION_RECURATE_TZ", "UTC")


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
    return pool_run_request(_scheduled_key("recurate", context), mode="retrain", trigger="schedule")


def _scheduled_key(prefix: str, context: ScheduleEvaluationContext) -> str:
    scheduled = context.scheduled_execution_time or datetime.now(timezone.utc)
    return f"{prefix}:{scheduled.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"


@schedule(
    name="maintenance_schedule",
    cron_schedule=maintenance_cron(),
    execution_timezone=recurate_timezone(),
    job=lake_maintenance_job,
    default_status=DefaultScheduleStatus.RUNNING if automation_status() == DefaultSensorStatus.RUNNING
    else DefaultScheduleStatus.STOPPED,
    description="Daily lake maintenance: compact the cluster layout's buckets that updates appended files to, "
    "vacuum the files no commit references (older than a week by default).",
)
def maintenance_schedule(context: ScheduleEvaluationContext):
    return RunRequest(run_key=_scheduled_key("maintenance", context), tags={TRIGGER_TAG: "schedule"})


SCHEDULES = [recurate_schedule, maintenance_schedule]
