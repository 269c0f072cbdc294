"""Concept clusters: k-means, assignment, incremental assignment, complexity (hand-computed)."""

import numpy as np
import pytest

from curation.select.clustering import (
    assign,
    assign_new,
    cluster_complexity,
    default_k,
    softmax,
    train_centroids,
)


def _blobs(seed=0, n_per=40, k=4, d=16, spread=0.15):
    rng = np.random.default_rng(seed)
    centers = np.eye(d, dtype=np.float32)[:k]
    x = np.repeat(centers, n_per, axis=0) + spread * rng.standard_normal((k * n_per, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_default_k():
    assert default_k(1) == 1
    assert default_k(1000) == 16
    assert default_k(100_000) == 158
    assert default_k(1_000_000) == 500
    assert default_k(10**8) == 1000
    assert default_k(20) <= 5  # at least ~4 members per cluster on average
    with pytest.raises(ValueError):
        default_k(0)


def test_kmeans_recovers_blobs_and_is_seeded():
    x, truth = _blobs()
    c1 = train_centroids(x, 4, niter=20, seed=7)
    c2 = train_centroids(x, 4, niter=20, seed=7)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)
    ids, cos = assign(x, c1)
    # Each true blob maps to exactly one cluster (a permutation of labels).
    for t in range(4):
        assert len(set(ids[truth == t])) == 1
    assert len(set(ids)) == 4
    with pytest.raises(ValueError, match="k: got 500"):
        train_centroids(x, 500)


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_assign_is_argmax_inner_product(block):
    x, _ = _blobs(seed=1)
    rng = np.random.default_rng(2)
    c = rng.standard_normal((5, x.shape[1])).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    ids, cos = assign(x, c, block=block)
    g = x @ c.T
    np.testing.assert_array_equal(ids, g.argmax(1))
    np.testing.assert_allclose(cos, g.max(1), atol=1e-5)
    assert ids.dtype == np.int32 and cos.dtype == np.float32


def test_incremental_assignment_does_not_retrain():
    x, _ = _blobs(seed=3)
    uids = np.array([f"{i:032x}" for i in range(len(x))])
    old = np.arange(len(x)) % 3 != 0
    cent = train_centroids(x[old], 4, niter=10, seed=0)
    before = cent.copy()
    new_idx, ids, cos = assign_new(uids, x, cent, uids[old])
    np.testing.assert_array_equal(new_idx, np.flatnonzero(~old))
    ref_ids, ref_cos = assign(x[~old], cent)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(cos, ref_cos)
    np.testing.assert_array_equal(cent, before)
    empty_idx, _, _ = assign_new(uids, x, cent, uids)
    assert empty_idx.size == 0


def _hand_case():
    centroids = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32)
    cluster_ids = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    cos = np.array([0.9, 0.7, 1.0, 0.8, 0.6, 0.5, 0.9, 0.9], dtype=np.float32)
    return cluster_ids, cos, centroids


def test_complexity_hand_computed():
    cid, cos, cent = _hand_case()
    # pairwise centroid cosines: 0-1 .6, 1-3 .8, all others 0
    r = cluster_complexity(cid, cos, cent, n_neighbors=2, tau=0.5)
    np.testing.assert_array_equal(r.size, [2, 3, 1, 2])
    np.testing.assert_allclose(r.d_intra, [0.2, 0.2, 0.5, 0.1], atol=1e-6)
    # l = 2 nearest OTHER centroids: 0 -> {.6, 0}, 1 -> {.8, .6}, 2 -> {0, 0}, 3 -> {.8, 0}
    np.testing.assert_allclose(r.d_inter, [0.7, 0.3, 1.0, 0.6], atol=1e-6)
    c_valid = [0.14, 0.06, 0.06]
    np.testing.assert_allclose(r.complexity, [0.14, 0.06, np.mean(c_valid), 0.06], atol=1e-6)
    e = np.exp(np.array([0.14, 0.06, np.mean(c_valid), 0.06]) / 0.5)
    np.testing.assert_allclose(r.weight, e / e.sum(), atol=1e-9)
    assert r.n_neighbors == 2 and r.tau == 0.5


def test_complexity_l_is_min_20_k_minus_1_and_blocked():
    cid, cos, cent = _hand_case()
    r = cluster_complexity(cid, cos, cent)  # l = min(20, 3) = 3: every other centroid
    np.testing.assert_allclose(r.d_inter, [(0.4 + 1 + 1) / 3, (0.4 + 1 + 0.2) / 3, 1.0, (1 + 0.2 + 1) / 3], atol=1e-6)
    r1 = cluster_complexity(cid, cos, cent, n_neighbors=1)
    np.testing.assert_allclose(r1.d_inter, [0.4, 0.2, 1.0, 0.2], atol=1e-6)
    rb = cluster_complexity(cid, cos, cent, n_neighbors=2, block=1)
    np.testing.assert_allclose(rb.d_inter, cluster_complexity(cid, cos, cent, n_neighbors=2).d_inter)


def test_complexity_edge_cases():
    cent = np.array([[1, 0]], np.float32)
    r = cluster_complexity(np.array([0, 0]), np.array([1.0, 0.5]), cent)
    assert r.d_inter[0] == 0 and r.complexity[0] == 0 and r.weight[0] == 1.0
    # empty cluster: d_intra 0, complexity the mean of the others, no NaN anywhere
    cent2 = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    r2 = cluster_complexity(np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.9, 0.9]), cent2)
    assert not np.isnan(r2.complexity).any() and r2.size[2] == 0
    assert r2.complexity[2] == pytest.approx(r2.complexity[:2].mean())
    with pytest.raises(ValueError, match="cluster_ids: got ids outside"):
        cluster_complexity(np.array([5]), np.array([1.0]), cent2)
    with pytest.raises(ValueError, match="tau: got 0"):
        softmax(np.zeros(2), 0)
