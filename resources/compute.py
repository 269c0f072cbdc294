"""The compute resource injected into heavy assets (embeddings, training, evaluation)."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from curation.engine.compute import ComputeSpec


class ComputeResource(ConfigurableResource):
    """Device (``auto`` -> CUDA if present, else CPU), precision, batch size, loader workers."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    precision: str = Field(default="fp32", description="fp32 | bf16 | fp16 (fp16 on CUDA only)")
    batch_size: int = Field(default=64, description="batch size for encoders / training")
    num_workers: int = Field(default=2, description="decode/preprocess workers overlapping the forward pass")

    def spec(self) -> ComputeSpec:
        return ComputeSpec(
            device=self.device,
            precision=self.precision,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
