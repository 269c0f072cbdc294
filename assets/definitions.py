"""The one explicit ``Definitions`` of the platform (loaded by ``workspace.yaml``).

:func:`build_definitions` assembles it from the stage modules; ``defs`` is its result.
"""

from __future__ import annotations

from dagster import Definitions

from assets import embed, evaluate, ingest, jobs, schedules, select, sensors, train
from assets.checks import embed as embed_checks
from assets.checks import evaluate as evaluate_checks
from assets.checks import ingest as ingest_checks
from assets.checks import select as select_checks
from assets.checks import train as train_checks
from resources import ComputeResource, DatasetsResource, LakeResource
from resources.distributed import DistributedResource
from resources.encoder import EncoderResource

STAGE_MODULES = (ingest, embed, select, train, evaluate)
CHECK_MODULES = (ingest_checks, embed_checks, select_checks, train_checks, evaluate_checks)


def default_resources() -> dict:
    """Resources bound by key, with defaults that run on the embedded dataset."""
    return {
        "lake": LakeResource(),
        "datasets": DatasetsResource(),
        "compute": ComputeResource(),
        "encoder": EncoderResource(),
        "distributed": DistributedResource(),
    }


def build_definitions(resources: dict | None = None) -> Definitions:
    """Every asset, check, job, sensor and schedule of the lineage, with ``resources`` bound
    (default: :func:`default_resources`)."""
    return Definitions(
        assets=[a for m in STAGE_MODULES for a in m.ASSETS],
        asset_checks=[c for m in CHECK_MODULES for c in m.CHECKS],
        jobs=jobs.JOBS,
        schedules=schedules.SCHEDULES,
        sensors=sensors.SENSORS,
        resources=resources if resources is not None else default_resources(),
    )


defs = build_definitions()
