"""Compute settings shared by the heavy stages (embedding, training, evaluation).

A :class:`ComputeSpec` is plain data; the Dagster ``ComputeResource`` builds one and
injects it. ``device="auto"`` picks CUDA when present, else CPU, so the same code runs
on a GPU box with a config change only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ComputeSpec:
    """Device, precision, batch size and loader workers for a heavy stage."""

    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 64
    num_workers: int = 2

    def __post_init__(self):
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device: got {self.device!r}; expected one of {DEVICES} or 'cuda:N'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: got {self.precision!r}; expected one of {PRECISIONS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: got {self.batch_size}; expected >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: got {self.num_workers}; expected >= 0")

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} requested but CUDA is not available")
        return torch.device(self.device)

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def autocast(self):
        """Autocast context for the forward pass (a no-op for fp32; fp16 only on CUDA)."""
        import torch

        dev = self.torch_device()
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.precision == "fp16" and dev.type != "cuda":
            raise ValueError("precision 'fp16' is supported on CUDA only; use 'bf16' or 'fp32' on CPU")
        return torch.autocast(device_type=dev.type, dtype=self.torch_dtype())

    @property
    def gpus(self) -> int:
        """GPUs one worker should ask for (used for Ray actors)."""
        import torch

        return 1 if self.torch_device().type == "cuda" else 0
