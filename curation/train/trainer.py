"""Train an open_clip model on a subset at matched compute (samples seen).

Strategies (ALGORITHMS.md section 9, "Scaling (Down) CLIP"):

* ``clip``    symmetric InfoNCE with a learnable temperature (``open_clip.ClipLoss``).
* ``clip_da`` CLIP plus strong image augmentation: random resized crop, color jitter
  (brightness / contrast / saturation), random grayscale, horizontal flips except for
  samples whose caption mentions left or right.
* ``flip``    CLIP with random masking of image patches (open_clip's ``patch_dropout``;
  ViT image towers only). Masking is active in training mode only.
* ``slip``    CLIP loss on a weakly augmented view plus a SimCLR NT-Xent loss between two
  strongly augmented views of each image, through an MLP head on the image features
  (temperature 0.1), summed with weight 1.

Compute is matched by samples seen (the DataComp protocol): every recipe trains for
``ceil(samples_seen / batch_size)`` steps of ``batch_size`` samples; a subset smaller than
``samples_seen`` is repeated epoch by epoch (a fresh seeded permutation per epoch, the
ragged tail of an epoch is dropped so that no sample appears twice in one batch).

Training is seeded and deterministic on one device: the model init uses ``torch.manual_seed``,
the data order and augmentations use an explicit ``torch.Generator``. AdamW (no weight decay
on gains, biases, embeddings and the temperature) with linear warmup and cosine decay.

Checkpoints are the plain open_clip state dict saved with ``torch.save`` so that
``open_clip.create_model_and_transforms(model_name, pretrained=path)`` loads them, plus a
JSON sidecar (``<dir>/<stem>.json`` beside ``<dir>/<stem>.pt``, :func:`sidecar_path`) with the
model name, the model config, the training config and the loss history.

Defaults and their measured cost (the project machine: 2 shared CPU cores, torch 2.13 CPU,
fp32, batch 128, real 72x72 emoji pool; steady-state samples/s of the training loop):

============================  ===============  ================
config / strategy             2 threads, idle  1 thread, loaded
============================  ===============  ================
tiny-vit-p8-32 / clip         ~650             ~400
tiny-vit-p8-32 / flip (0.5)   ~820             ~475
tiny-vit-p8-32 / clip_da      ~735             ~375
tiny-vit-p8-32 / slip         ~310             ~220
tiny-rn-32 / clip             ~660             ~400
============================  ===============  ================

So the default 16,384 samples seen (128 steps of 128) take ~25 s per recipe with ``clip``
(2.4 epochs of the 6.7k-sample default pool, 4.9 epochs of a half-size subset). Trained on
the full default pool this way and evaluated on the held-out emoji split (862 images of 227
concepts never in the pool; chance in parentheses):

===========================================  ==========  ==============
metric (chance)                              tiny-rn-32  tiny-vit-p8-32
===========================================  ==========  ==============
retrieval recall@10 (0.012)                  0.47        0.23
retrieval mean recall@1 (0.001)              0.13        0.04
9 groups, mean per-class recall (0.11)       0.21        0.24
90 subgroups, mean per-class recall (0.011)  0.069       0.036
===========================================  ==========  ==============

The ResNet learns much faster at this budget, so it is the default; ``flip`` needs the ViT.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from curation.engine.compute import ComputeSpec

log = logging.getLogger(__name__)

STRATEGIES = ("clip", "clip_da", "flip", "slip")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
DEFAULT_MODEL = "tiny-rn-32"
# ~25 s per recipe on the 2-core CPU at ~650 samples/s (see the table in the module docstring).
DEFAULT_SAMPLES_SEEN = 16_384
DEFAULT_BATCH_SIZE = 128

_LEFT_RIGHT = re.compile(r"\b(left|right)(wards?|most)?\b", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


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
        if self.grad_clip_norm is not None and not (self.grad_clip_norm > 0):
            raise ValueError(f"grad_clip_norm: got {self.grad_clip_norm!r}; expected None or a float > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys (the message lists the valid ones)."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"TrainConfig keys: got unknown {unknown}; expected a subset of {sorted(valid)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def read_webdataset_pairs(tar_paths: Iterable[str | Path]) -> tuple[list[str], list[Image.Image], list[str]]:
    """Read image-caption pairs from webdataset tar shards.

    A sample is the group of members sharing a key (the member's base name up to its first
    dot): ``<key>.png|jpg|jpeg|webp`` and ``<key>.txt``. Samples without an image or a
    caption are skipped with a warning (the subset export writes both for every sample).

    Returns:
        ``(keys, images, captions)``: lists of equal length in shard then member order;
        images are decoded (``PIL.Image``, fully loaded) with Pillow.
    """
    keys: list[str] = []
    images: list[Image.Image] = []
    captions: list[str] = []
    skipped = 0
    for path in tar_paths:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, ext = base.split(".", 1)
                f = tf.extractfile(m)
                if f is None:
                    continue
                groups.setdefault(key, {})[ext.lower()] = f.read()
        for key, members in groups.items():
            img_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if img_ext is None or "txt" not in members:
                skipped += 1
                continue
            img = Image.open(io.BytesIO(members[img_ext]))
            img.load()
            keys.append(key)
            images.append(img)
            captions.append(members["txt"].decode("utf-8").strip())
    if skipped:
        log.warning("skipped %d samples without an image or a caption", skipped)
    return keys, images, captions


def mentions_left_right(caption: str) -> bool:
    """True when a caption mentions a direction that a horizontal flip would contradict."""
    return bool(_LEFT_RIGHT.search(caption))


def batch_index_stream(n: int, batch_size: int, steps: int, generator: torch.Generator,
                       sizes: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """Indices of ``steps`` batches of ``batch_size`` from ``n`` samples, epoch by epoch.

    Each epoch is a fresh permutation drawn from ``generator``; its last ``n % batch_size``
    indices are dropped, so a batch never holds a sample twice. Requires ``batch_size <= n``.
    With ``sizes`` (see :func:`batch_sizes`), batch ``i`` keeps only its first ``sizes[i]``
    indices.

    Yields:
        ``(batch_size,)`` (or ``(sizes[i],)``) int64 index tensors.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: got {batch_size}; expected 1 <= batch_size <= n = {n}")
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for b in range(min(per_epoch, steps - done)):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            yield idx if sizes is None else idx[: sizes[done + b]]
        done += min(per_epoch, steps - done)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``base_lr``, then cosine to 0.

    ``lr = base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, else
    ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) * base_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay)) * base_lr


# --------------------------------------------------------------------------------------------
# augmentations (batched, on normalized tensors; randomness from an explicit generator)
# --------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    flip_ok: torch.Tensor | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-sample random resized crop (and optional horizontal flip) of a batch.

    Args:
        x: ``(B, C, H, W)`` float images.
        scale: range of the crop's area as a fraction of the image.
        generator: CPU generator for the crop parameters.
        flip_ok: ``(B,) bool``; where True the crop is mirrored with probability 0.5
            (``None``: no flips).
        ratio: range of the crop's aspect ratio (log-uniform).

    Returns:
        ``(B, C, H, W)`` crops resized back to ``H x W`` (bilinear).
    """
    b = x.shape[0]
    area = _uniform(b, scale[0], scale[1], generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # centre in [-1, 1] coords
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    sx = w.clone()
    if flip_ok is not None:
        flip = (torch.rand(b, generator=generator) < 0.5) & flip_ok.cpu()
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter_grayscale(
    x01: torch.Tensor, jitter: float, grayscale_p: float, generator: torch.Generator, p_jitter: float = 0.8
) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation jitter, then random grayscale.

    Args:
        x01: ``(B, 3, H, W)`` float RGB in ``[0, 1]``.
        jitter: factors are drawn from ``[1 - jitter, 1 + jitter]``; applied with
            probability ``p_jitter`` per sample.
        grayscale_p: probability of replacing a sample by its luma (ITU-R 601) in 3 channels.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    b = x01.shape[0]
    dev, dt = x01.device, x01.dtype

    def factor():
        f = _uniform(b, 1 - jitter, 1 + jitter, generator)
        on = torch.rand(b, generator=generator) < p_jitter
        return torch.where(on, f, torch.ones_like(f)).to(dev, dt).view(b, 1, 1, 1)

    luma_w = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=dt).view(1, 3, 1, 1)
    fb, fc, fs = factor(), factor(), factor()
    x = (x01 * fb).clamp(0, 1)
    mean = (x * luma_w).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * fc + mean).clamp(0, 1)
    gray = (x * luma_w).sum(1, keepdim=True)
    x = ((x - gray) * fs + gray).clamp(0, 1)
    g = (torch.rand(b, generator=generator) < grayscale_p).to(dev).view(b, 1, 1, 1)
    gray = (x * luma_w).sum(1, keepdim=True).expand_as(x)
    return torch.where(g, gray, x)


class _Augmenter:
    """Strong / weak views of normalized image batches (mean/std of the model's preprocess)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], cfg: TrainConfig, device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.cfg = cfg

    def strong(self, x: torch.Tensor, scale_min: float, flip_ok: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = random_resized_crop(x, (scale_min, 1.0), g, flip_ok=flip_ok)
        x01 = (x * self.std + self.mean).clamp(0, 1)
        x01 = color_jitter_grayscale(x01, self.cfg.jitter, self.cfg.grayscale_p, g)
        return (x01 - self.mean) / self.std

    def weak(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return random_resized_crop(x, (0.5, 1.0), g, flip_ok=None)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss between two views.

    Args:
        z1, z2: ``(B, d)`` projections of the two views of the same ``B`` images (any
            norm; they are L2-normalized here).
        temperature: softmax temperature (0.1 in SLIP).

    Returns:
        Scalar: mean over the ``2B`` anchors of ``-log softmax`` of the positive (the other
        view of the same image) among the ``2B - 1`` other views.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLRHead(nn.Module):
    """MLP head of SLIP's SimCLR branch: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _open_clip():
    from curation.embed.model_registry import register_model_configs

    register_model_configs()
    import open_clip

    return open_clip


def is_vit(model_name: str) -> bool:
    """True when the model's image tower is an open_clip ViT (patch dropout applies)."""
    cfg = _open_clip().get_model_config(model_name) or {}
    v = cfg.get("vision_cfg", {})
    return v.get("timm_model_name") is None and isinstance(v.get("layers", 12), int) and v.get("patch_size") is not None


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu"):
    """Create the open_clip model (random init from ``cfg.seed``), its eval transform and tokenizer.

    Raises:
        ValueError: unknown model name (lists the valid names), or ``flip`` with a non-ViT tower.

    Returns:
        ``(model, preprocess_val, tokenizer)``.
    """
    open_clip = _open_clip()
    names = open_clip.list_models()
    if cfg.model not in names:
        raise ValueError(f"model: got {cfg.model!r}; expected one of {names}")
    kwargs: dict[str, Any] = {}
    if cfg.strategy == "flip":
        if not is_vit(cfg.model):
            raise ValueError(
                f"strategy 'flip': got model {cfg.model!r} whose image tower is not a ViT; "
                "expected a ViT config (patch dropout masks ViT patches)"
            )
        kwargs["force_patch_dropout"] = cfg.patch_dropout
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, device=device, **kwargs)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return model, preprocess, tokenizer


def _param_groups(model: nn.Module, extra: Sequence[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on gains/biases/embeddings/logit scale (open_clip)."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "embedding" in n

    named = list(model.named_parameters())
    for i, m in enumerate(extra):
        named += [(f"extra{i}.{n}", p) for n, p in m.named_parameters()]
    decay = [p for n, p in named if p.requires_grad and not exclude(n, p)]
    no_decay = [p for n, p in named if p.requires_grad and exclude(n, p)]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _embed_dim(model: nn.Module) -> int:
    v = model.visual
    d = getattr(v, "output_dim", None)
    if isinstance(d, int):
        return d
    return int(model.text_projection.shape[1])


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        model: the trained open_clip model (eval mode, on the training device).
        config: the training config.
        steps: optimizer steps taken.
        batch_size: pairs per step actually used.
        samples_seen: exactly ``config.samples_seen`` (the last batches trimmed, :func:`batch_sizes`).
        n_train: distinct pairs in the training set.
        seconds: wall time of the training loop (excluding data decoding).
        samples_per_s: ``samples_seen / seconds``.
        history: one dict per ``log_every`` steps and the last step, with keys ``step``,
            ``samples_seen``, ``epoch``, ``loss``, ``clip_loss``, ``ssl_loss``, ``lr``,
            ``logit_scale``, ``samples_per_s``, ``elapsed_s``.
    """

    model: nn.Module
    config: TrainConfig
    steps: int
    batch_size: int
    samples_seen: int
    n_train: int
    seconds: float
    samples_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return float(self.history[-1]["loss"]) if self.history else float("nan")


def plan_steps(samples_seen: int, batch_size: int, n: int) -> tuple[int, int]:
    """``(batch, steps)``: the batch is ``min(batch_size, n)``; steps ``ceil(samples_seen / batch)``."""
    if n < 2:
        raise ValueError(f"training set: got {n} samples; expected >= 2 (a contrastive batch needs negatives)")
    batch = min(batch_size, n)
    if batch < batch_size:
        log.warning("only %d samples: batch size %d lowered to %d", n, batch_size, batch)
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


def train_clip(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    config: TrainConfig,
    compute: ComputeSpec | None = None,
    progress=None,
) -> TrainResult:
    """Train an open_clip model on image-caption pairs with one strategy at matched samples seen.

    Args:
        images: ``n`` decoded images (any mode; transparency is composited on white).
        captions: ``n`` captions.
        config: the run (model, strategy, samples seen, optimizer, seed, ...).
        compute: device and precision (``fp16`` uses a gradient scaler, CUDA only).
        progress: optional callable of a :class:`curation.engine.progress.ProgressEvent`, called every ``log_every`` steps.

    Returns:
        A :class:`TrainResult` (the model in eval mode, history, throughput).
    """
    from curation.embed.encoders import to_rgb
    from curation.engine.progress import report

    if len(images) != len(captions):
        raise ValueError(f"images/captions: got {len(images)} and {len(captions)}; expected equal lengths")
    compute = compute or ComputeSpec()
    device = compute.torch_device()
    cfg = config
    model, preprocess, tokenizer = build_model(cfg, device=device)
    open_clip = _open_clip()
    pcfg = open_clip.get_model_preprocess_cfg(model)

    n = len(images)
    batch, steps = plan_steps(cfg.samples_seen, cfg.batch_size, n)
    sizes = batch_sizes(cfg.samples_seen, batch, steps)
    t0 = time.perf_counter()
    pixels = torch.stack([preprocess(to_rgb(im)) for im in images])  # (n, 3, S, S) float32, normalized
    tokens = tokenizer(list(captions))  # (n, context_length) int64
    flip_ok = torch.tensor([not mentions_left_right(c) for c in captions], dtype=torch.bool)
    log.info(
        "prepared %d pairs in %.1fs (images %s, tokens %s); %s/%s: %d steps x %d = %d samples seen",
        n, time.perf_counter() - t0, tuple(pixels.shape), tuple(tokens.shape),
        cfg.model, cfg.strategy, steps, batch, sum(sizes),
    )  # fmt: skip

    head = None
    extra: list[nn.Module] = []
    if cfg.strategy == "slip":
        torch.manual_seed(cfg.seed + 1)
        head = SimCLRHead(_embed_dim(model), cfg.ssl_hidden_dim, cfg.ssl_out_dim).to(device)
        extra.append(head)
    aug = _Augmenter(pcfg["mean"], pcfg["std"], cfg, device)
    groups = _param_groups(model, extra, cfg.weight_decay)
    opt_kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        optimizer = torch.optim.AdamW(groups, fused=True, **opt_kwargs)
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device / dtype
        optimizer = torch.optim.AdamW(groups, **opt_kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
    clip_loss_fn = open_clip.ClipLoss()
    warmup = int(round(cfg.warmup_fraction * steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    max_log_scale = math.log(100.0)

    model.train()
    if head is not None:
        head.train()
    history: list[dict[str, float]] = []
    win_loss, win_clip, win_ssl, win_n, win_samples, seen = 0.0, 0.0, 0.0, 0, 0, 0
    t_start = time.perf_counter()
    t_win = t_start
    per_epoch = n // batch
    for step, idx in enumerate(batch_index_stream(n, batch, steps, gen, sizes=sizes)):
        lr = cosine_lr(step, steps, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = pixels[idx].to(device, non_blocking=True)
        t = tokens[idx].to(device, non_blocking=True)
        ssl_loss = torch.zeros((), device=device)
        with compute.autocast():
            if cfg.strategy == "clip_da":
                x = aug.strong(x, cfg.crop_scale_min, flip_ok[idx], gen)
            if cfg.strategy == "slip":
                v1 = aug.strong(x, cfg.ssl_crop_scale_min, flip_ok[idx], gen)
                v2 = aug.strong(x, cfg.ssl_crop_scale_min, flip_ok[idx], gen)
                x = aug.weak(x, gen)
                feats = model.encode_image(torch.cat([x, v1, v2]))
                img_feats, f1, f2 = feats.split(len(idx))
                ssl_loss = nt_xent_loss(head(f1), head(f2), cfg.ssl_temperature)
            else:
                img_feats = model.encode_image(x)
            img = F.normalize(img_feats, dim=-1)
            txt = model.encode_text(t, normalize=True)
            clip_loss = clip_loss_fn(img, txt, model.logit_scale.exp())
            loss = clip_loss + cfg.ssl_weight * ssl_loss if cfg.strategy == "slip" else clip_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} ({cfg.model}/{cfg.strategy}, lr {lr:.2e})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        win_loss += float(loss.detach())
        win_clip += float(clip_loss.detach())
        win_ssl += float(ssl_loss.detach())
        win_n += 1
        win_samples += len(idx)
        seen += len(idx)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            rec = {
                "step": step + 1,
                "samples_seen": seen,
                "epoch": seen / (per_epoch * batch),
                "loss": win_loss / win_n,
                "clip_loss": win_clip / win_n,
                "ssl_loss": win_ssl / win_n,
                "lr": lr,
                "logit_scale": float(model.logit_scale.detach().exp()),
                "samples_per_s": win_samples / max(now - t_win, 1e-9),
                "elapsed_s": now - t_start,
            }
            history.append(rec)
            report(progress, "train", rec["step"], steps, seen, rec["elapsed_s"], rec["samples_per_s"], loss=rec["loss"], lr=lr)
            log.info(
                "step %d/%d  samples %d  loss %.4f  lr %.2e  scale %.1f  %.0f samples/s",
                rec["step"], steps, rec["samples_seen"], rec["loss"], lr, rec["logit_scale"], rec["samples_per_s"],
            )  # fmt: skip
            win_loss, win_clip, win_ssl, win_n, win_samples = 0.0, 0.0, 0.0, 0, 0
            t_win = now
    seconds = time.perf_counter() - t_start
    model.eval()
    return TrainResult(
        model=model,
        config=cfg,
        steps=steps,
        batch_size=batch,
        samples_seen=seen,
        n_train=n,
        seconds=seconds,
        samples_per_s=seen / max(seconds, 1e-9),
        history=history,
    )


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "open_clip state_dict (torch.save)"


def sidecar_path(checkpoint_path: str | Path) -> Path:
    """The JSON sidecar beside a checkpoint: ``<dir>/<stem>.json`` for ``<dir>/<stem>.pt``."""
    p = Path(checkpoint_path)
    return p.with_suffix(".json")


def save_checkpoint(result: TrainResult, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
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
    """Load a checkpoint written by :func:`save_checkpoint`.

    The model is built from the registered config name when open_clip knows it, else from
    the config stored in the sidecar; the weights load with ``torch.load(weights_only=True)``
    and ``strict=True``.

    Returns:
        ``(model in eval mode, sidecar dict)``.
    """
    open_clip = _open_clip()
    meta = read_sidecar(path)
    name = meta["model_name"]
    if name in open_clip.list_models():
        model = open_clip.create_model(name, device="cpu")
    else:
        from open_clip.model import CLIP

        model = CLIP(**meta["model_config"])
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def train_from_shards(
    tar_paths: Sequence[str | Path],
    config: TrainConfig,
    checkpoint_path: str | Path,
    compute: ComputeSpec | None = None,
    extra: dict[str, Any] | None = None,
    progress=None,
) -> tuple[TrainResult, Path]:
    """Read a subset export's webdataset shards, train, save the checkpoint and its sidecar.

    Returns:
        ``(result, checkpoint path)``.
    """
    tar_paths = sorted(str(p) for p in tar_paths)
    if not tar_paths:
        raise FileNotFoundError("no webdataset shards to train on (got an empty list of tar files)")
    t0 = time.perf_counter()
    _, images, captions = read_webdataset_pairs(tar_paths)
    log.info("read %d pairs from %d shards in %.1fs", len(images), len(tar_paths), time.perf_counter() - t0)
    result = train_clip(images, captions, config, compute, progress=progress)
    path = save_checkpoint(result, checkpoint_path, extra=extra)
    return result, path


__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_MODEL",
    "DEFAULT_SAMPLES_SEEN",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "batch_index_stream",
    "build_model",
    "color_jitter_grayscale",
    "cosine_lr",
    "is_vit",
    "load_checkpoint",
    "mentions_left_right",
    "nt_xent_loss",
    "plan_steps",
    "random_resized_crop",
    "read_sidecar",
    "read_webdataset_pairs",
    "save_checkpoint",
    "sidecar_path",
    "train_clip",
    "train_from_shards",
]
