"""Image augmentations on normalized tensor batches, randomness from an explicit generator.

``clip_da`` and ``slip`` use :class:`Augmenter` (``strong``: random resized crop, horizontal
flip except for captions that mention left/right, colour jitter, random grayscale; ``weak``:
random resized crop of scale [0.5, 1]). All ops are batched (``(B, 3, H, W)`` float32 on the
training device) and seeded through a ``torch.Generator`` on the CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from curation.train.config import TrainConfig

_LEFT_RIGHT = re.compile(r"\b(left|right)(wards?|most)?\b", re.IGNORECASE)


def mentions_left_right(caption: str) -> bool:
    """True when a caption mentions a direction that a horizontal flip would contradict."""
    return bool(_LEFT_RIGHT.search(caption))


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


class Augmenter:
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


_Augmenter = Augmenter  # the old private name
