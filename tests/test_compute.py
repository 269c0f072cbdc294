import pytest
import torch

from curation.engine.compute import ComputeSpec
from resources import ComputeResource


def test_auto_device_resolves_to_available_hardware():
    dev = ComputeSpec(device="auto").torch_device()
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"device": "tpu"}, "device: got 'tpu'"), ({"precision": "fp8"}, "precision: got 'fp8'"),
     ({"batch_size": 0}, "batch_size: got 0"), ({"num_workers": -1}, "num_workers: got -1")],
)
def test_invalid_settings_are_rejected_with_the_allowed_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ComputeSpec(**kwargs)


def test_resource_builds_spec_and_autocast():
    spec = ComputeResource(device="cpu", precision="bf16", batch_size=8, num_workers=0).spec()
    assert spec == ComputeSpec("cpu", "bf16", 8, 0)
    with spec.autocast():
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA only"):
        ComputeSpec(device="cpu", precision="fp16").autocast()


def test_torchvision_imports_with_no_shim():
    """The pinned torch/torchvision pair imports and runs its transforms as is."""
    import torchvision.transforms as T

    out = T.Compose([T.Resize(8), T.ToTensor()])(__import__("PIL.Image").Image.new("RGB", (16, 16)))
    assert tuple(out.shape) == (3, 8, 8)
