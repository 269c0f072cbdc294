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


@dataclass
class TrainRun:
    """One run asked of :func:`train_runs`: its config, checkpoint path, sidecar extras, progress."""

    config: TrainConfig
    checkpoint_path: str | Path
    extra: dict[str, Any] | None = None
    progress: Any = None


def resolve_backend(config: TrainConfig, n_pairs: int | None) -> str:
    """The backend a run uses: ``config.resolved_backend()``, except that ``auto`` falls back to
    the platform loop for a subset smaller than one batch (open_clip_train samples shards with
    replacement: a batch larger than the subset would hold the same pair twice, a false negative
    for the contrastive loss; the platform loop caps the batch at the subset size).

    Raises:
        ValueError: backend ``open_clip_train`` chosen explicitly for such a subset.
    """
    backend = config.resolved_backend()
    if backend == "open_clip_train" and n_pairs is not None and n_pairs < config.batch_size:
        if config.backend != "auto":
            raise ValueError(
                f"backend open_clip_train: got a subset of {n_pairs} pairs for batch_size {config.batch_size}; expected "
                f"at least one batch of distinct pairs (lower batch_size, or use backend 'platform', which caps it)"
            )
        log.warning("subset of %d pairs < batch_size %d: backend auto uses the platform loop", n_pairs, config.batch_size)
        return "platform"
    return backend


def train_runs(
    tar_paths: Sequence[str | Path], runs: Sequence[TrainRun], compute: ComputeSpec | None = None
) -> list[tuple[TrainSummary, Path]]:
    """Several runs on the same subset (seeds, budgets, strategies), each with its backend.

    The open_clip_train runs share ONE subprocess (:func:`run_open_clip_train_many`: the process
    start is paid once, each run still has its own log, samples-seen check and checkpoint); the
    platform runs go through :func:`train_from_shards` in this process. Every run gives what
    :func:`train_subset` gives for it alone.

    Returns:
        ``[(summary, checkpoint path)]`` in the order of ``runs``.
    """
    tar_paths = sorted(str(p) for p in tar_paths)
    n = None
    if any(r.config.resolved_backend() == "open_clip_train" for r in runs):
        n = count_pairs(tar_paths)
    backends = [resolve_backend(r.config, n) for r in runs]  # every run checked before any trains
    out: list[tuple[TrainSummary, Path] | None] = [None] * len(runs)
    oct_idx = [i for i, b in enumerate(backends) if b == "open_clip_train"]
    if oct_idx:
        from curation.train.open_clip_backend import OpenClipTrainJob, run_open_clip_train_many

        jobs = [OpenClipTrainJob(runs[i].config, Path(runs[i].checkpoint_path), runs[i].extra, runs[i].progress) for i in oct_idx]
        for i, (run, path) in zip(oct_idx, run_open_clip_train_many(tar_paths, jobs, compute)):
            out[i] = (TrainSummary("open_clip_train", run.samples_seen, run.steps, run.batch_size, n, run.seconds,
                                   run.samples_per_s, run.final_loss, run.history), path)  # fmt: skip
    for i, b in enumerate(backends):
        if b != "platform":
            continue
        r = runs[i]
        res, path = train_from_shards(tar_paths, r.config, r.checkpoint_path, compute, extra=r.extra, progress=r.progress)
        out[i] = (TrainSummary("platform", res.samples_seen, res.steps, res.batch_size, res.n_train, res.seconds,
                               res.samples_per_s, res.final_loss, res.history), path)  # fmt: skip
    return [o for o in out if o is not None]


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
    return train_runs(tar_paths, [TrainRun(config, checkpoint_path, extra, progress)], compute)[0]


__all__ = [
    "BACKENDS",
    "CHECKPOINT_FORMAT",
    "DEFAULT_MODEL",
    "DEFAULT_SAMPLES_SEEN",
    "NAMED_CONFIGS",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "TrainRun",
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
    "resolve_backend",
    "train_runs",
    "train_subset",
]
