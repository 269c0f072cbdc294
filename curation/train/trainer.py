"""Train an open_clip model on a subset at matched compute (samples seen): the entry points.

The package (docs/training.md):

* :mod:`~curation.train.config`      ``TrainConfig``, strategies, backends, named presets
  (``tiny-cpu``, ``datacomp-small``, ``datacomp-medium``), the step plan and LR schedule;
* :mod:`~curation.train.data`        streaming batches from webdataset shards;
* :mod:`~curation.train.augmentation` batched, seeded image augmentations;
* :mod:`~curation.train.strategies`  one strategy object per objective (its loss);
* :mod:`~curation.train.loop`        the platform's loop (any strategy);
* :mod:`~curation.train.open_clip_backend` open_clip_train as a subprocess (clip, clip_da, flip);
* :mod:`~curation.train.checkpoints` checkpoint IO and the typed ``checkpoints`` record.

:func:`train_subset` picks the backend (``TrainConfig.backend``; ``auto``: open_clip_train
for clip / clip_da / flip, the platform loop for slip) and returns the same summary for both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.engine.compute import ComputeSpec
from curation.train.augmentation import (
    color_jitter_grayscale,
    mentions_left_right,
    random_resized_crop,
)
from curation.train.checkpoints import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
)
from curation.train.config import (
    BACKENDS,
    DEFAULT_MODEL,
    DEFAULT_SAMPLES_SEEN,
    NAMED_CONFIGS,
    STRATEGIES,
    TrainConfig,
    batch_sizes,
    cosine_lr,
    named_config,
    plan_steps,
)
from curation.train.data import batch_index_stream, read_webdataset_pairs
from curation.train.loop import TrainResult, run_training, train_clip, train_from_shards
from curation.train.strategies import build_model, is_vit, nt_xent_loss

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What either backend reports about a finished run (the ``checkpoints`` record's measures).

    Attributes:
        backend: ``open_clip_train`` or ``platform``.
        samples_seen, steps, batch_size: the compute actually spent (samples seen checked).
        n_train: distinct pairs in the subset.
        seconds: wall time of the training (the subprocess for open_clip_train).
        samples_per_s: training throughput (median logged rate for open_clip_train).
        final_loss: the last logged loss.
        history: the logged points (``samples_seen``, ``loss``, ``samples_per_s``, ...).
    """

    backend: str
    samples_seen: int
    steps: int
    batch_size: int
    n_train: int
    seconds: float
    samples_per_s: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)

    def measures(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("samples_seen", "steps", "batch_size", "n_train", "seconds",
                                                "samples_per_s", "final_loss")}  # fmt: skip


def count_pairs(tar_paths: Sequence[str | Path]) -> int:
    """Samples with an image and a caption in some shards (member names only, streamed)."""
    from curation.ingest.shards import iter_samples
    from curation.train.data import _pair

    return sum(1 for p in tar_paths for _, m in iter_samples(p) if _pair(m) is not None)


def train_subset(
    tar_paths: Sequence[str | Path],
    config: TrainConfig,
    checkpoint_path: str | Path,
    compute: ComputeSpec | None = None,
    extra: dict[str, Any] | None = None,
    progress=None,
) -> tuple[TrainSummary, Path]:
    """Train on a subset's webdataset shards with the configured backend; save a platform checkpoint.

    ``progress`` (optional callable of a :class:`curation.engine.progress.ProgressEvent`) hears
    from either backend (open_clip_train's log is followed while it runs).

    Returns:
        ``(summary, checkpoint path)``; the checkpoint loads with
        :func:`curation.embed.model_registry.load_checkpoint` whichever backend wrote it.
    """
    backend = config.resolved_backend()
    tar_paths = sorted(str(p) for p in tar_paths)
    n = count_pairs(tar_paths) if backend == "open_clip_train" else None
    if n is not None and n < config.batch_size:
        if config.backend != "auto":
            # open_clip_train samples shards with replacement: a batch larger than the subset
            # would hold the same pair twice (a false negative for the contrastive loss)
            raise ValueError(
                f"backend open_clip_train: got a subset of {n} pairs for batch_size {config.batch_size}; expected "
                f"at least one batch of distinct pairs (lower batch_size, or use backend 'platform', which caps it)"
            )
        # `auto` chose open_clip_train: the platform loop caps the batch at the subset size instead
        log.warning("subset of %d pairs < batch_size %d: backend auto uses the platform loop", n, config.batch_size)
        backend = "platform"
    if backend == "open_clip_train":
        from curation.train.open_clip_backend import run_open_clip_train

        run, path = run_open_clip_train(tar_paths, config, checkpoint_path, compute, extra=extra, progress=progress)
        summary = TrainSummary(backend, run.samples_seen, run.steps, run.batch_size, n,
                               run.seconds, run.samples_per_s, run.final_loss, run.history)  # fmt: skip
        return summary, path
    res, path = train_from_shards(tar_paths, config, checkpoint_path, compute, extra=extra, progress=progress)
    summary = TrainSummary(backend, res.samples_seen, res.steps, res.batch_size, res.n_train, res.seconds,
                           res.samples_per_s, res.final_loss, res.history)  # fmt: skip
    return summary, path


__all__ = [
    "BACKENDS",
    "CHECKPOINT_FORMAT",
    "DEFAULT_MODEL",
    "DEFAULT_SAMPLES_SEEN",
    "NAMED_CONFIGS",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "TrainSummary",
    "batch_index_stream",
    "batch_sizes",
    "build_model",
    "color_jitter_grayscale",
    "cosine_lr",
    "count_pairs",
    "is_vit",
    "load_checkpoint",
    "mentions_left_right",
    "named_config",
    "nt_xent_loss",
    "plan_steps",
    "random_resized_crop",
    "read_sidecar",
    "read_webdataset_pairs",
    "run_training",
    "save_checkpoint",
    "train_clip",
    "train_from_shards",
    "train_subset",
]
