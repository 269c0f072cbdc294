"""Checkpoint IO: the open_clip state dict + a JSON sidecar, and the typed checkpoint record.

Checkpoints are the plain open_clip state dict saved with ``torch.save`` (so
``open_clip.create_model_and_transforms(model_name, pretrained=path)`` loads them) plus a JSON
sidecar (``<dir>/<stem>.json`` beside ``<dir>/<stem>.pt``) with the model name, the model
config, the training config and the loss history. Loading goes through the ONE loader,
:func:`curation.embed.model_registry.load_checkpoint`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curation.embed.model_registry import load_checkpoint as load_open_clip_checkpoint
from curation.embed.model_registry import sidecar_path
from curation.train.strategies import _open_clip

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "open_clip state_dict (torch.save)"


def save_checkpoint(result, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save the open_clip state dict (``torch.save``) and its JSON sidecar.

    The state dict alone loads with ``open_clip.create_model_and_transforms(model_name,
    pretrained=path)``; the sidecar holds ``model_name``, ``model_config`` (the open_clip
    config dict), ``train_config``, ``steps``, ``batch_size``, ``samples_seen``, ``n_train``,
    ``seconds``, ``samples_per_s``, ``final_loss``, ``history`` and ``extra``.

    Returns:
        The checkpoint path.
    """
    open_clip = _open_clip()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in result.model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "backend": (extra or {}).get("backend", "platform"),
        "model_name": result.config.model,
        "model_config": open_clip.get_model_config(result.config.model),
        "train_config": result.config.to_dict(),
        "steps": result.steps,
        "batch_size": result.batch_size,
        "samples_seen": result.samples_seen,
        "n_train": result.n_train,
        "seconds": result.seconds,
        "samples_per_s": result.samples_per_s,
        "final_loss": result.final_loss,
        "history": result.history,
        "extra": extra or {},
    }
    sidecar_path(path).write_text(json.dumps(meta, indent=2, default=float))
    log.info("saved checkpoint %s (%s, %d samples seen)", path, result.config.model, result.samples_seen)
    return path


def read_sidecar(checkpoint_path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint (see :func:`save_checkpoint`)."""
    p = sidecar_path(checkpoint_path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint sidecar {p} not found (expected beside {checkpoint_path})")
    return json.loads(p.read_text())


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint (either backend's) with the one loader; ``(model in eval mode, sidecar dict)``."""
    model, _, _, meta = load_open_clip_checkpoint(path, None, device=device)
    return model, meta


# --------------------------------------------------------------------------------------------
# the typed checkpoint record (one row of the `checkpoints` table)
# --------------------------------------------------------------------------------------------

# column -> polars dtype name; ``path`` is relative to the artifacts root of the data home
CHECKPOINT_COLUMNS: dict[str, str] = {
    "recipe": "String",
    "backend": "String",
    "strategy": "String",
    "model": "String",
    "seed": "Int64",
    "path": "String",
    "samples_seen": "Int64",
    "steps": "Int64",
    "batch_size": "Int64",
    "n_train": "Int64",
    "lr": "Float64",
    "weight_decay": "Float64",
    "warmup_fraction": "Float64",
    "patch_dropout": "Float64",
    "seconds": "Float64",
    "samples_per_s": "Float64",
    "final_loss": "Float64",
    "main_budget": "Boolean",  # False for the extra compute-curve budgets of a recipe
    "torch_threads": "Int64",  # the intra-op thread count the run used (results depend on it)
}


def checkpoint_schema() -> dict:
    """The polars schema of the ``checkpoints`` table (:data:`CHECKPOINT_COLUMNS`)."""
    import polars as pl

    return {k: getattr(pl, v) for k, v in CHECKPOINT_COLUMNS.items()}


def relative_artifact_path(path: str | Path, artifacts_root: str | Path) -> str:
    """``path`` relative to ``artifacts_root`` (posix separators), so a data home can move.

    Raises:
        ValueError: ``path`` is not under ``artifacts_root``.
    """
    p, root = Path(path).resolve(), Path(artifacts_root).resolve()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"checkpoint path: got {p}; expected a file under the artifacts root {root}") from None


def resolve_artifact_path(path: str, artifacts_root: str | Path) -> Path:
    """A stored artifact path back to a file: relative ones are joined to ``artifacts_root``."""
    p = Path(path)
    return p if p.is_absolute() else Path(artifacts_root) / p


def checkpoint_record(
    recipe: str, cfg, backend: str, path: str | Path, artifacts_root: str | Path, **measured: Any
) -> dict[str, Any]:
    """One typed row of the ``checkpoints`` table.

    Args:
        cfg: the :class:`~curation.train.config.TrainConfig` of the run.
        backend: ``open_clip_train`` or ``platform``.
        measured: ``samples_seen, steps, batch_size, n_train, seconds, samples_per_s, final_loss``;
            optional ``main_budget`` (default True) and ``torch_threads`` (default: this process's).
    """
    import torch

    row = {
        "recipe": recipe, "backend": backend, "strategy": cfg.strategy, "model": cfg.model, "seed": int(cfg.seed),
        "path": relative_artifact_path(path, artifacts_root), "lr": float(cfg.lr),
        "weight_decay": float(cfg.weight_decay), "warmup_fraction": float(cfg.warmup_fraction),
        "patch_dropout": float(cfg.patch_dropout),
    }  # fmt: skip
    for k in ("samples_seen", "steps", "batch_size", "n_train"):
        row[k] = int(measured[k])
    for k in ("seconds", "samples_per_s", "final_loss"):
        row[k] = float(measured[k])
    row["main_budget"] = bool(measured.get("main_budget", True))
    row["torch_threads"] = int(measured.get("torch_threads") or torch.get_num_threads())
    missing = sorted(set(CHECKPOINT_COLUMNS) - set(row))
    if missing:
        raise ValueError(f"checkpoint record: got no {missing}; expected all of {list(CHECKPOINT_COLUMNS)}")
    return {k: row[k] for k in CHECKPOINT_COLUMNS}
