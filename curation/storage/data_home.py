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
import re
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


_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(name: str, what: str = "name") -> str:
    """Validate one path component that comes from data or config (a recipe, dataset, shard).

    Returns ``name`` unchanged if it is safe as a single directory or file name; otherwise
    raises ``ValueError``: empty, ``.``/``..``, starting with ``.`` or ``-``, containing a path
    separator (``/``, ``\\``), a control character, or a Windows drive prefix.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: got {name!r}; expected a non-empty name")
    if name in (".", "..") or name.startswith((".", "-")):
        raise ValueError(f"{what}: got {name!r}; expected a name that does not start with '.' or '-'")
    if _UNSAFE_NAME.search(name) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"{what}: got {name!r}; expected no '/', '\\', ':' drive prefix or control characters")
    return name


def safe_child(root: str | os.PathLike, *names: str) -> Path:
    """``root / names[0] / names[1] ...`` after checking every name (:func:`check_name`) and
    that the resolved result (symlinks followed) stays inside ``root``.

    The one way a name from data or config becomes a path: a recipe called
    ``../../../x@0.5`` or a symlink planted under the data home raises ``ValueError`` instead
    of writing (or deleting) outside it.
    """
    base = Path(root).absolute()
    for n in names:
        check_name(n)
    p = base.joinpath(*names)
    real_base = base.resolve()
    real = p.resolve()
    if real != real_base and real_base not in real.parents:
        raise ValueError(f"path {p}: resolves to {real}, outside {real_base}; expected a path inside the data home")
    return p
