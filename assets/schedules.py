"""Schedules: periodic re-curation (re-cluster, re-score, re-prune, retrain, re-evaluate).

``recurate_schedule`` (cron from ``CURATION_RECURATE_CRON``, default weekly; stopped by
default) requests a ``pool_curation_job`` run with mode ``retrain``, run_key
``recurate:<scheduled time>``; the chain sensors (:mod:`assets.sensors`) do the rest.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from dagster import DefaultScheduleStatus, ScheduleEvaluationContext, schedule

from assets.jobs import pool_curation_job, pool_run_request

DEFAULT_RECURATE_CRON = "0 3 * * 0"  # Sundays 03:00


def recurate_cron() -> str:
    """Cron of the re-curation schedule: ``CURATION_RECURATE_CRON`` (default weekly)."""
    return os.environ.get("CURATION_RECURATE_CRON", DEFAULT_RECURATE_CRON)


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
    scheduled = context.scheduled_execution_time or datetime.now(timezone.utc)
    run_key = f"recurate:{scheduled.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    return pool_run_request(run_key, mode="retrain", trigger="schedule")


SCHEDULES = [recurate_schedule]
