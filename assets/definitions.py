"""The one explicit ``Definitions`` of the platform (loaded by ``workspace.yaml``)."""

from __future__ import annotations

from dagster import Definitions

from assets import automation, embeddings, ingest, jobs, models, pool, sensors
from assets.checks import embeddings as embeddings_checks
from assets.checks import ingest as ingest_checks
from assets.checks import models as models_checks
from assets.checks import pool as pool_checks
from resources import ComputeResource, DatasetsResource, LakeResource
from resources.distributed import DistributedResource
from resources.encoder import EncoderResource


def default_resources() -> dict:
    """Resources bound by key, with defaults that run on the embedded dataset."""
    return {
        "lake": LakeResource(),
        "datasets": DatasetsResource(),
        "compute": ComputeResource(),
        "encoder": EncoderResource(),
        "distributed": DistributedResource(),
    }


defs = Definitions(
    assets=[*ingest.ASSETS, *embeddings.ASSETS, *pool.ASSETS, *models.ASSETS],
    asset_checks=[*ingest_checks.CHECKS, *embeddings_checks.CHECKS, *pool_checks.CHECKS, *models_checks.CHECKS],
    jobs=[*jobs.JOBS, *automation.JOBS],
    schedules=[*automation.SCHEDULES],
    sensors=[*sensors.SENSORS, *automation.SENSORS],
    resources=default_resources(),
)
