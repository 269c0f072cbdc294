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
