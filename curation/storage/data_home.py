"""Where things land by default: one data home, overridable with ``CURATION_HOME``.

Layout under the data home (all paths overridable through the Dagster resources)::

    landing/<dataset>/<NNNNN>.tar|.parquet   raw img2dataset-style shards (the sensor watches this)
    eval/<split>/...                         held-out evaluation sets (never in the pool)
    lake/<table>/                            Delta tables (the source of truth)
    artifacts/subsets/<recipe>/              subset exports (uid .npy, parquet manifest, shards)
    artifacts/checkpoints/<recipe>/          trained checkpoints
    artifacts/reports/                       curation_report.html / .md and plots
"""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    return Path(os.environ.get("CURATION_HOME", "data")).absolute()


def default_landing() -> str:
    return str(data_home() / "landing")


def default_eval_root() -> str:
    return str(data_home() / "eval")


def default_lake_root() -> str:
    return str(data_home() / "lake")


def default_artifacts_root() -> str:
    return str(data_home() / "artifacts")
