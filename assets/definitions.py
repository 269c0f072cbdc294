"""The one explicit ``Definitions`` of the platform (loaded by ``workspace.yaml``).

:func:`build_definitions` assembles it from the stage modules. Nothing is built at import:
Dagster's loader calls :func:`load_definitions` (``@dg.definitions``, its documented lazy
entry point), and ``from assets.definitions import defs`` builds (once per process) on first
access. So importing this module reads neither the environment (``CURATION_HOME``: the
resources' defaults) nor the recipe file (the recipe partitions read it on first use).
"""

from __future__ import annotations

import dagster as dg
from dagster import Definitions


def stage_modules() -> tuple:
    """The asset modules, one per lineage stage (imported here, not at module import: the
    sensors and the schedule read their switches from the environment when defined)."""
    from assets import embed, evaluate, ingest, select, train

    return (ingest, embed, select, train, evaluate)


def check_modules() -> tuple:
    """The asset-check modules, one per lineage stage."""
    from assets.checks import embed, evaluate, ingest, select, train

    return (ingest, embed, select, train, evaluate)


def default_resources() -> dict:
    """Resources bound by key, with defaults that run on the embedded dataset."""
    from resources import ComputeResource, DatasetsResource, LakeResource
    from resources.distributed import DistributedResource
    from resources.encoder import EncoderResource

    return {
        "lake": LakeResource(),
        "datasets": DatasetsResource(),
        "compute": ComputeResource(),
        "encoder": EncoderResource(),
        "distributed": DistributedResource(),
    }


def build_definitions(resources: dict | None = None) -> Definitions:
    """Every asset, check, job, sensor and schedule of the lineage, with ``resources`` bound
    (default: :func:`default_resources`). The environment (``CURATION_AUTOMATION``, the
    re-curation cron, ``CURATION_HOME`` for the resources' defaults) is read here, not at import."""
    from assets import jobs, maintenance, schedules, sensors

    return Definitions(
        assets=[a for m in stage_modules() for a in m.ASSETS],
        asset_checks=[c for m in check_modules() for c in m.CHECKS],
        jobs=[*jobs.JOBS, maintenance.lake_maintenance_job],
        schedules=schedules.SCHEDULES,
        sensors=sensors.SENSORS,
        resources=resources if resources is not None else default_resources(),
    )


_DEFS: Definitions | None = None


def get_defs() -> Definitions:
    """:func:`build_definitions` with the default resources, built once per process."""
    global _DEFS
    if _DEFS is None:
        _DEFS = build_definitions()
    return _DEFS


@dg.definitions
def load_definitions() -> Definitions:
    """The entry point ``dagster dev -w workspace.yaml`` loads (lazily)."""
    return get_defs()


def __getattr__(name: str):  # PEP 562: ``from assets.definitions import defs`` builds lazily
    if name == "defs":
        return get_defs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
