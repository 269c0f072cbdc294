"""Training configuration: one frozen dataclass, the strategies, the backends and named presets.

Strategies (ALGORITHMS.md section 9, "Scaling (Down) CLIP"): ``clip`` (symmetric InfoNCE,
learnable temperature), ``clip_da`` (CLIP + random resized crop, colour jitter, grayscale),
``flip`` (CLIP + random patch masking, ViT towers only), ``slip`` (CLIP + SimCLR on two strong
views). Their losses live in :mod:`curation.train.strategies`.

Backends (:data:`BACKENDS`): ``open_clip_train`` runs open_clip's own trainer as a subprocess
over the subset's webdataset shards (clip, clip_da, flip; :mod:`curation.train.open_clip_backend`);
``platform`` runs :mod:`curation.train.loop` (every strategy; the only one for ``slip``, which
open_clip_train lacks). ``auto`` picks ``open_clip_train`` where it can and ``platform`` for slip.

Named presets (:data:`NAMED_CONFIGS`): ``tiny-cpu`` (the defaults below, ~25 s per recipe on
the 2-core CPU) and DataComp's ``datacomp-small`` / ``datacomp-medium`` training settings
(Gadre et al. 2023, Table 2 / Appendix: ViT-B/32, global batch 4096, lr 5e-4, weight decay 0.2,
500 warmup steps, AdamW beta2 0.98, 12.8M / 128M samples seen, bf16 on GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

STRATEGIES = ("clip", "clip_da", "flip", "slip")
BACKENDS = ("auto", "open_clip_train", "platform")
# strategies open_clip_train can run (its loss is CLIP; clip_da = its aug_cfg, flip = patch dropout)
OPEN_CLIP_TRAIN_STRATEGIES = ("clip", "clip_da", "flip")
DEFAULT_MODEL = "tiny-rn-32"
# ~25 s per recipe on the 2-core CPU at ~650 samples/s (see the table in the module docstring).
DEFAULT_SAMPLES_SEEN = 16_384
# 64, not 128: at the tiny budgets of a CPU run the number of steps matters more than the number
# of negatives (emoji pool, 8,192 samples seen, open_clip_train, seed 0: average 0.114 at batch 64
# vs 0.092 at batch 128; docs/training.md)
DEFAULT_BATCH_SIZE = 64




@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved beside the checkpoint).

    Attributes:
        model: an open_clip config name (``open_clip.list_models()``, including the
            platform's ``curation/embed/model_configs``).
        strategy: one of :data:`STRATEGIES`.
        samples_seen: image-caption pairs processed in total (the compute budget); the run
            takes ``ceil(samples_seen / batch_size)`` steps.
        batch_size: pairs per step (capped at the number of samples of a tiny subset).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to gains, biases, embeddings, logit scale).
        beta1, beta2, eps: AdamW hyper-parameters (open_clip's defaults for ViTs).
        warmup_fraction: fraction of the steps with a linear warmup, then cosine decay to 0.
        grad_clip_norm: clip the global gradient norm to this value (``None``: no clipping).
        seed: seeds the model init, the data order and the augmentations.
        patch_dropout: fraction of image patches dropped per step (``flip`` only).
        crop_scale_min: smallest area fraction of the random resized crop (``clip_da``).
        ssl_crop_scale_min: smallest crop area fraction of the two SimCLR views (``slip``).
        jitter: strength of brightness / contrast / saturation jitter (factors in
            ``[1 - jitter, 1 + jitter]``, applied with probability 0.8).
        grayscale_p: probability of converting a view to grayscale.
        ssl_temperature: SimCLR temperature (``slip``).
        ssl_weight: weight of the SimCLR loss added to the CLIP loss (``slip``).
        ssl_hidden_dim, ssl_out_dim: widths of the SimCLR MLP head (``slip``).
        log_every: log and record the history every this many steps.
        backend: one of :data:`BACKENDS` (``auto``: open_clip_train for clip / clip_da / flip,
            the platform loop for slip).
    """

    model: str = DEFAULT_MODEL
    strategy: str = "clip"
    samples_seen: int = DEFAULT_SAMPLES_SEEN
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_fraction: float = 0.1
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    patch_dropout: float = 0.5
    crop_scale_min: float = 0.4
    ssl_crop_scale_min: float = 0.25
    jitter: float = 0.4
    grayscale_p: float = 0.2
    ssl_temperature: float = 0.1
    ssl_weight: float = 1.0
    ssl_hidden_dim: int = 256
    ssl_out_dim: int = 128
    log_every: int = 10
    backend: str = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: got {self.strategy!r}; expected one of {list(STRATEGIES)}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: got {self.model!r}; expected an open_clip config name")
        for name in ("samples_seen", "batch_size", "log_every", "ssl_hidden_dim", "ssl_out_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: got {v!r}; expected an int >= 1")
        if self.samples_seen < 2:
            raise ValueError(f"samples_seen: got {self.samples_seen}; expected >= 2 (one contrastive batch)")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed: got {self.seed!r}; expected an int >= 0")
        for name in ("lr", "ssl_temperature", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: got {v!r}; expected a finite float > 0")
        for name in ("weight_decay", "ssl_weight", "jitter"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: got {v!r}; expected a finite float >= 0")
        if self.jitter >= 1:
            raise ValueError(f"jitter: got {self.jitter!r}; expected a float in [0, 1)")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (0 <= v < 1):
                raise ValueError(f"{name}: got {v!r}; expected a float in [0, 1)")
        for name in ("warmup_fraction", "grayscale_p"):
            v = getattr(self, name)
            if not (0 <= v <= 1):
                raise ValueError(f"{name}: got {v!r}; expected a float in [0, 1]")
        if not (0 <= self.patch_dropout < 1):
            raise ValueError(f"patch_dropout: got {self.patch_dropout!r}; expected a float in [0, 1)")
        for name in ("crop_scale_min", "ssl_crop_scale_min"):
            v = getattr(self, name)
            if not (0 < v <= 1):
                raise ValueError(f"{name}: got {v!r}; expected a float in (0, 1]")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: got {self.backend!r}; expected one of {list(BACKENDS)}")
        if self.backend == "open_clip_train" and self.strategy not in OPEN_CLIP_TRAIN_STRATEGIES:
            raise ValueError(
                f"backend 'open_clip_train': got strategy {self.strategy!r}; expected one of "
                f"{list(OPEN_CLIP_TRAIN_STRATEGIES)} (slip runs on backend 'platform')"
            )
        if self.grad_clip_norm is not None and not (self.grad_clip_norm > 0):
            raise ValueError(f"grad_clip_norm: got {self.grad_clip_norm!r}; expected None or a float > 0")

    def resolved_backend(self) -> str:
        """``open_clip_train`` or ``platform`` (``auto`` resolved per strategy)."""
        if self.backend != "auto":
            return self.backend
        return "open_clip_train" if self.strategy in OPEN_CLIP_TRAIN_STRATEGIES else "platform"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys (the message lists the valid ones)."""
        valid = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items()}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"TrainConfig keys: got unknown {unknown}; expected a subset of {sorted(valid)}")
        return cls(**d)


# DataComp's training settings (small / medium scale); for GPUs (bf16), open_clip_train backend.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-cpu": {},
    "datacomp-small": dict(
        model="ViT-B-32", samples_seen=12_800_000, batch_size=4096, lr=5e-4, weight_decay=0.2,
        beta1=0.9, beta2=0.98, eps=1e-6, warmup_fraction=500 / 3125, grad_clip_norm=None,
    ),
    "datacomp-medium": dict(
        model="ViT-B-32", samples_seen=128_000_000, batch_size=4096, lr=5e-4, weight_decay=0.2,
        beta1=0.9, beta2=0.98, eps=1e-6, warmup_fraction=500 / 31250, grad_clip_norm=None,
    ),
}


def named_config(name: str, **overrides: Any) -> TrainConfig:
    """A preset of :data:`NAMED_CONFIGS` with ``overrides`` (e.g. ``strategy``, ``seed``).

    Raises:
        ValueError: unknown name (lists the valid ones) or an invalid override.
    """
    if name not in NAMED_CONFIGS:
        raise ValueError(f"named config: got {name!r}; expected one of {sorted(NAMED_CONFIGS)}")
    return replace(TrainConfig(**NAMED_CONFIGS[name]), **overrides) if overrides else TrainConfig(**NAMED_CONFIGS[name])


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """Warmup steps of a run of ``steps`` steps: ``round(warmup_fraction * steps)``."""
    return int(round(cfg.warmup_fraction * steps))


def plan_steps(samples_seen: int, batch_size: int, n: int) -> tuple[int, int]:
    """``(batch, steps)``: the batch is ``min(batch_size, n)``; steps ``ceil(samples_seen / batch)``."""
    import logging

    if n < 2:
        raise ValueError(f"training set: got {n} samples; expected >= 2 (a contrastive batch needs negatives)")
    batch = min(batch_size, n)
    if batch < batch_size:
        logging.getLogger(__name__).warning("only %d samples: batch size %d lowered to %d", n, batch_size, batch)
    return batch, math.ceil(samples_seen / batch)


def batch_sizes(samples_seen: int, batch: int, steps: int) -> list[int]:
    """Sizes of the ``steps`` batches: ``batch`` each, the last ones trimmed so that they sum to
    EXACTLY ``samples_seen`` (compute matched across recipes whatever the subset size), and no
    batch smaller than 2 (a contrastive batch needs a negative).

    Raises:
        ValueError: if ``samples_seen < 2``.
    """
    if samples_seen < 2:
        raise ValueError(f"samples_seen: got {samples_seen}; expected >= 2")
    sizes = [batch] * steps
    sizes[-1] = samples_seen - batch * (steps - 1)
    if sizes[-1] == 1:  # move one sample from the previous batch (batch >= 3 here)
        sizes[-2] -= 1
        sizes[-1] = 2
    return sizes


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``base_lr``, then cosine to 0.

    ``lr = base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, else
    ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) * base_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay)) * base_lr
