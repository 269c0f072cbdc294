"""Training objectives: one strategy object per objective, so the loop does not know which.

A :class:`Strategy` owns everything objective-specific: the model-build options
(``flip``: patch dropout), extra trainable modules (``slip``: the SimCLR head), the views of a
batch (``clip_da``: strong augmentation) and the loss. :func:`make_strategy` builds one from a
:class:`~curation.train.config.TrainConfig`; :func:`curation.train.loop.run_training` only calls
``strategy.loss(model, batch)``.

* ``clip``    symmetric InfoNCE with a learnable temperature (``open_clip.ClipLoss``).
* ``clip_da`` CLIP on a strongly augmented view (:class:`~curation.train.augmentation.Augmenter`).
* ``flip``    CLIP with open_clip's ``patch_dropout`` (ViT towers; active in train mode only).
* ``slip``    CLIP on a weak view + SimCLR NT-Xent between two strong views through an MLP head
  (temperature 0.1), weighted ``ssl_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curation.embed.encoders import embed_dim
from curation.train.augmentation import Augmenter
from curation.train.config import STRATEGIES, TrainConfig


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
    kwargs: dict[str, Any] = make_strategy(cfg).model_kwargs()
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, device=device, **kwargs)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return model, preprocess, tokenizer


def param_groups(model: nn.Module, extra: Sequence[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on gains/biases/embeddings/logit scale (open_clip)."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "embedding" in n

    named = list(model.named_parameters())
    for i, m in enumerate(extra):
        named += [(f"extra{i}.{n}", p) for n, p in m.named_parameters()]
    decay = [p for n, p in named if p.requires_grad and not exclude(n, p)]
    no_decay = [p for n, p in named if p.requires_grad and exclude(n, p)]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass
class Batch:
    """One training batch on the device.

    Attributes:
        images: ``(B, 3, S, S) float32`` normalized pixels.
        tokens: ``(B, context_length) int64``.
        flip_ok: ``(B,) bool`` (CPU): False where the caption mentions left/right.
    """

    images: torch.Tensor
    tokens: torch.Tensor
    flip_ok: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


class Strategy:
    """CLIP: the base objective. Subclasses change the views, the modules or the loss.

    Args:
        cfg: the run's config.
    """

    name = "clip"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._clip_loss = None
        self.augmenter: Augmenter | None = None

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``open_clip.create_model_and_transforms`` options."""
        return {}

    def setup(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], device: torch.device) -> list[nn.Module]:
        """Prepare for training ``model``; returns extra trainable modules (on ``device``)."""
        import open_clip

        self._clip_loss = open_clip.ClipLoss()
        self.augmenter = Augmenter(mean, std, self.cfg, device)
        return []

    def image_features(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image features (B, d), auxiliary loss scalar)``."""
        return model.encode_image(batch.images), torch.zeros((), device=batch.images.device)

    def loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``{"loss": total, "clip_loss": ..., "ssl_loss": ...}`` (scalars, autograd-connected)."""
        feats, aux = self.image_features(model, batch, gen)
        img = F.normalize(feats, dim=-1)
        txt = model.encode_text(batch.tokens, normalize=True)
        clip = self._clip_loss(img, txt, model.logit_scale.exp())
        return {"loss": clip + self.cfg.ssl_weight * aux if self.name == "slip" else clip, "clip_loss": clip, "ssl_loss": aux}


class ClipDAStrategy(Strategy):
    """CLIP on one strong view (random resized crop, flip, colour jitter, grayscale)."""

    name = "clip_da"

    def image_features(self, model, batch, gen):
        x = self.augmenter.strong(batch.images, self.cfg.crop_scale_min, batch.flip_ok, gen)
        return model.encode_image(x), torch.zeros((), device=x.device)


class FlipStrategy(Strategy):
    """CLIP with random patch masking (``force_patch_dropout``; ViT image towers only)."""

    name = "flip"

    def model_kwargs(self) -> dict[str, Any]:
        if not is_vit(self.cfg.model):
            raise ValueError(
                f"strategy 'flip': got model {self.cfg.model!r} whose image tower is not a ViT; "
                "expected a ViT config (patch dropout masks ViT patches)"
            )
        return {"force_patch_dropout": self.cfg.patch_dropout}


class SlipStrategy(Strategy):
    """CLIP on a weak view + SimCLR between two strong views through :class:`SimCLRHead`."""

    name = "slip"

    def setup(self, model, mean, std, device):
        super().setup(model, mean, std, device)
        torch.manual_seed(self.cfg.seed + 1)
        self.head = SimCLRHead(embed_dim(model), self.cfg.ssl_hidden_dim, self.cfg.ssl_out_dim).to(device)
        return [self.head]

    def image_features(self, model, batch, gen):
        c = self.cfg
        v1 = self.augmenter.strong(batch.images, c.ssl_crop_scale_min, batch.flip_ok, gen)
        v2 = self.augmenter.strong(batch.images, c.ssl_crop_scale_min, batch.flip_ok, gen)
        x = self.augmenter.weak(batch.images, gen)
        feats = model.encode_image(torch.cat([x, v1, v2]))
        img, f1, f2 = feats.split(len(batch))
        return img, nt_xent_loss(self.head(f1), self.head(f2), c.ssl_temperature)


_STRATEGY_CLASSES = {"clip": Strategy, "clip_da": ClipDAStrategy, "flip": FlipStrategy, "slip": SlipStrategy}
assert tuple(_STRATEGY_CLASSES) == STRATEGIES


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy object of ``cfg.strategy``."""
    return _STRATEGY_CLASSES[cfg.strategy](cfg)
