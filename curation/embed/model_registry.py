"""Model-config registry: the platform's small open_clip architectures.

Configs are data: one JSON per architecture in ``curation/embed/model_configs/``, registered with
open_clip (``open_clip.add_model_config``) so ``open_clip.create_model(name)`` and
``open_clip.list_models()`` see them beside open_clip's own configs.
"""

from __future__ import annotations

import functools
from pathlib import Path


def model_config_dir() -> str:
    """The directory of the shipped JSON configs (``curation/embed/model_configs``)."""
    return str(Path(__file__).resolve().parent / "model_configs")


@functools.cache
def register_model_configs() -> list[str]:
    """Register the shipped configs with open_clip (idempotent). Returns their names."""
    import open_clip

    names = sorted(p.stem for p in Path(model_config_dir()).glob("*.json"))
    if names:
        open_clip.add_model_config(model_config_dir())
    return names
