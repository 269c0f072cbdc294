"""Ray vs in-process parity for the executor, and the per-cluster wrappers."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from curation.engine.compute import ComputeSpec
from curation.engine.executor import (
    DistributedConfig,
    InProcessExecutor,
    RayExecutor,
    cluster_members,
    gpus_for_compute,
    make_executor,
)


def _weighted_rows(idx, x, scale=1.0):
    """A pure per-item function over a shared matrix: row sums of x[idx] times scale."""
    return (x[idx].sum(axis=1) * scale).astype(np.float64)


class _Scaler:
    """A stateful worker: setup once, then a method per item."""

    def __init__(self):
        self.setups = 1
        self.w = np.arange(4, dtype=np.float32)

    def apply(self, idx, x):
        return x[idx] @ self.w


@pytest.fixture(scope="module")
def ray_executor():
    """One local Ray session (2 CPUs) for the whole module: Ray start-up is the slow part."""
    import ray.cloudpickle

    # This test module is not importable on Ray workers (pytest puts it on sys.path of the
    # driver only): ship its helper functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = RayExecutor(DistributedConfig(address="local", num_cpus=2, max_in_flight=3))
    yield ex
    ex.shutdown()
    import ray

    assert not ray.is_initialized()


def test_in_process_does_not_import_ray():
    code = (
        "import sys, numpy as np\n"
        "from curation.engine.executor import make_executor, DistributedConfig\n"
        "ex = make_executor(DistributedConfig())\n"
        "assert ex.map(abs, [-1, 2, -3]) == [1, 2, 3]\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_validation_and_factory():
    with pytest.raises(ValueError, match="num_cpus: got 0"):
        DistributedConfig(address="local", num_cpus=0)
    with pytest.raises(ValueError, match="gpus_per_task: got -1"):
        DistributedConfig(gpus_per_task=-1)
    with pytest.raises(ValueError, match="address"):
        RayExecutor(DistributedConfig())
    assert isinstance(make_executor(None), InProcessExecutor)
    assert isinstance(make_executor(DistributedConfig(address="local")), RayExecutor)
    assert gpus_for_compute(ComputeSpec(device="cpu")) == 0
    assert gpus_for_compute(ComputeSpec(device="cuda:1")) == 1


def test_cluster_members_groups_and_sorts():
    got = cluster_members(np.array([2, 0, 2, 5, 0, 2]))
    assert [c for c, _ in got] == [0, 2, 5]
    assert [g.tolist() for _, g in got] == [[1, 4], [0, 2, 5], [3]]


def test_generic_map_parity(ray_executor):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    groups = [g for _, g in cluster_members(rng.integers(0, 9, size=200))]
    ref = InProcessExecutor().map(_weighted_rows, groups, shared={"x": x}, scale=2.0)
    got = ray_executor.map(_weighted_rows, groups, shared={"x": x}, scale=2.0)
    assert len(got) == len(ref) == len(groups)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    assert ray_executor.map(_weighted_rows, [], shared={"x": x}) == []


def test_stateful_map_parity(ray_executor):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    items = [np.arange(i, i + 5) for i in range(0, 45, 5)]
    ref = InProcessExecutor().map_stateful(_Scaler, "apply", items, shared={"x": x})
    got = ray_executor.map_stateful(_Scaler, "apply", items, num_workers=2, shared={"x": x})
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_local_ray_listens_on_loopback_only_when_ray_was_imported_first(ray_executor):
    """The module's Ray instance was started after this process imported Ray (the fixture
    imports ``ray.cloudpickle`` first): it still listens on loopback only."""
    import os

    import ray

    from net_helpers import is_loopback, listening_sockets

    assert ray_executor.map(abs, [-3]) == [3]
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    sockets = listening_sockets(os.getpid())
    assert len({pid for *_, pid in sockets}) >= 3, sockets  # driver, GCS, raylet at least
    assert [s for s in sockets if not is_loopback(s[1])] == []


def test_task_errors_propagate(ray_executor):
    import ray

    with pytest.raises(ray.exceptions.RayTaskError):
        ray_executor.map(_weighted_rows, [np.array([0, 99])], shared={"x": np.zeros((3, 4))})


def test_resource_builds_executors():
    from resources.distributed import DistributedResource

    assert isinstance(DistributedResource().executor(), InProcessExecutor)
    cfg = DistributedResource(address="local", num_cpus=2).config(ComputeSpec(device="cuda"))
    assert cfg.gpus_per_task == 1.0 and cfg.num_cpus == 2
    cfg = DistributedResource(address="ray://head:10001", gpus_per_task=0.5).config(ComputeSpec(device="cpu"))
    assert cfg.gpus_per_task == 0.5
    assert DistributedResource(address="local").config(ComputeSpec(device="cpu")).gpus_per_task == 0.0


def _pool(n=240, d=16, k=6, seed=0, dup_frac=0.2):
    """Seeded unit-norm pool with planted near-duplicates, clusters, and aligned captions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    n_dup = int(n * dup_frac)
    x[-n_dup:] = x[:n_dup] + 0.01 * rng.normal(size=(n_dup, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    cents = x[rng.choice(n, k, replace=False)]
    sims = x @ cents.T
    cid = sims.argmax(1).astype(np.int64)
    cos = sims.max(1).astype(np.float32)
    uids = np.array([f"{i * 7919 % 1000003:032x}" for i in range(n)])
    return x, y, cid, cos, uids


@pytest.mark.parametrize("rows_per_task", [1, 10_000])
def test_semdedup_parity_ray_vs_in_process(ray_executor, rows_per_task):
    from curation.select.semdedup import semdedup_scores
    from curation.select.semdedup import semdedup_scores_distributed

    x, _, cid, cos, uids = _pool()
    ref = semdedup_scores(x, cid, cos, uids, block=32)
    local = semdedup_scores_distributed(InProcessExecutor(), x, cid, cos, uids, block=32, rows_per_task=rows_per_task)
    got = semdedup_scores_distributed(ray_executor, x, cid, cos, uids, block=32, rows_per_task=rows_per_task)
    np.testing.assert_array_equal(local, ref)
    np.testing.assert_array_equal(got, ref)
    assert (ref > 0.99).sum() > 0  # planted duplicates were found: the comparison is not vacuous


@pytest.mark.parametrize("factorized", [False, True])
def test_clipcov_parity_ray_vs_in_process(ray_executor, factorized):
    from curation.select.clipcov import clipcov_select
    from curation.select.clipcov import clipcov_select_distributed

    x, y, cid, _, uids = _pool(seed=3)
    n_keep = 97
    ref = clipcov_select(x, y, cid, uids, n_keep, factorized=factorized)
    got = clipcov_select_distributed(ray_executor, x, y, cid, uids, n_keep, factorized=factorized, rows_per_task=50)
    assert len(ref[0]) == n_keep
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_chunk_groups_packs_in_order():
    from curation.engine.executor import chunk_groups

    assert chunk_groups(list("abcde"), [3, 3, 5, 1, 1], 6) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="rows_per_task"):
        chunk_groups([], [], 0)


def test_layout_tasks_read_their_bucket_on_ray(ray_executor, tmp_path):
    """SemDeDup and CLIPCov over the pool_by_cluster layout: each Ray task opens the lake and
    reads its own bucket (only the lake root travels); results equal the in-process loop."""
    import pyarrow as pa

    from curation.ingest.ids import make_uid
    from curation.select.layout import LayoutConfig, LayoutRef, build_layout, dedup_scores_by_bucket, fit_centroids
    from curation.storage.lake import Lake, matrix_to_list_column

    lake = Lake(str(tmp_path / "lake"))
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 16)).astype(np.float32)
    for s in range(3):
        x = centers[rng.integers(0, 5, 400)] + 0.5 * rng.standard_normal((400, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        lake.write("embeddings", pa.table({"uid": [make_uid("r", str(s), str(i)) for i in range(400)],
                                           "shard": [f"r-{s}"] * 400, "image_emb": matrix_to_list_column(x),
                                           "text_emb": matrix_to_list_column(y), "encoder": ["openclip:t"] * 400}),
                   partition=f"r-{s}")
    cent, _ = fit_centroids(lake, 5, niter=5)
    cfg = LayoutConfig(clusters_per_bucket=2, with_text=True)
    build_layout(lake, cent, cfg)
    ref = dedup_scores_by_bucket(lake, config=cfg, incremental=False).frame
    got = dedup_scores_by_bucket(lake, ray_executor, config=cfg, incremental=False).frame
    assert got.equals(ref)
    asg = lake.read("assignments").sort("uid")
    lr = LayoutRef.of(lake)
    args = (asg["uid"].to_numpy(), asg["cluster_id"].to_numpy(), 600, 4096, "factorized", False)
    a, b = lr.clipcov(*args), lr.clipcov(*args, executor=ray_executor)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
