"""Shared test setup: offline model loading, few torch threads, a small default dataset.

Fixtures:
    small_dataset: session-scoped data home with a small build of the default "emoji"
        dataset (100 concepts; about 270 pool samples in 3 shards of 100 and a held-out
        eval split), built once per session. Both styles and skin-tone variants are in it.
    lake_resources: factory ``lake_resources(landing=None, eval_root=None)`` returning the
        resources dict {"lake", "datasets", "compute"} on a fresh temp lake.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SMALL_LIMIT = 100
SMALL_SAMPLES_PER_SHARD = 100


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(2)
    except Exception:  # torch is optional for the ingest tests
        pass


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A data home with ``landing/emoji/*.tar|parquet`` and ``eval/emoji-heldout/`` (small build)."""
    from curation.ingest.emoji_dataset import build_default_dataset

    home = tmp_path_factory.mktemp("curation_home")
    build_default_dataset(home, limit=SMALL_LIMIT, samples_per_shard=SMALL_SAMPLES_PER_SHARD, seed=0, workers=1)
    return home


@pytest.fixture
def lake_resources(tmp_path):
    """Factory: ``lake_resources(landing=None, eval_root=None, max_pixels=40_000_000)`` ->
    ``{"lake": LakeResource, "datasets": DatasetsResource, "compute": ComputeResource}`` on a
    temp lake (``tmp_path/lake``, ``tmp_path/artifacts``)."""
    from resources import ComputeResource, DatasetsResource, LakeResource
    from resources.distributed import DistributedResource

    def make(landing=None, eval_root=None, max_pixels: int = 40_000_000) -> dict:
        return {
            "lake": LakeResource(root=str(tmp_path / "lake"), artifacts_root=str(tmp_path / "artifacts")),
            "datasets": DatasetsResource(
                landing=str(landing or tmp_path / "landing"),
                eval_root=str(eval_root or tmp_path / "eval"),
                max_pixels=max_pixels,
            ),
            "compute": ComputeResource(device="cpu", num_workers=0),
            "distributed": DistributedResource(),
        }

    return make


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: robust when the 2 cores are shared (2 threads can thrash
    under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
