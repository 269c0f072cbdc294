"""Blocked similarity kernels: hand-computed cases and blocked == dense parity."""

import numpy as np
import pytest

from curation.select.similarity import (
    blocked_max_sim,
    clipped_row_col_sums,
    max_sim_to_earlier,
    rowwise_dot,
    topk_inner_product,
)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_max_sim_to_earlier_hand_computed():
    s = np.float32(1 / np.sqrt(2))
    x = np.array([[1, 0], [0, 1], [s, s], [-1, 0]], dtype=np.float32)
    m = max_sim_to_earlier(x)
    np.testing.assert_allclose(m, [-1.0, 0.0, s, 0.0], atol=1e-6)
    assert m.dtype == np.float32


def test_max_sim_to_earlier_trivial_sizes():
    assert max_sim_to_earlier(np.zeros((0, 3), np.float32)).shape == (0,)
    np.testing.assert_array_equal(max_sim_to_earlier(np.ones((1, 3), np.float32)), [-1.0])


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_max_sim_to_earlier_blocked_equals_dense(block):
    x = _unit(np.random.default_rng(0), 50, 8)
    g = x @ x.T
    dense = np.array([-1.0] + [g[j, :j].max() for j in range(1, 50)], dtype=np.float32)
    np.testing.assert_allclose(max_sim_to_earlier(x, block=block), dense, atol=1e-6)


@pytest.mark.parametrize("block", [1, 4, 100])
def test_blocked_max_sim_equals_dense(block):
    rng = np.random.default_rng(1)
    q, k = _unit(rng, 20, 6), _unit(rng, 13, 6)
    np.testing.assert_allclose(blocked_max_sim(q, k, block=block), (q @ k.T).max(1), atol=1e-6)
    assert np.all(np.isneginf(blocked_max_sim(q, k[:0])))


@pytest.mark.parametrize("block", [1, 5, 64])
def test_topk_excludes_self_and_matches_dense(block):
    c = _unit(np.random.default_rng(2), 12, 5)
    sims, idx = topk_inner_product(c, c, 4, exclude_self=True, block=block)
    g = c @ c.T
    np.fill_diagonal(g, -np.inf)
    ref = -np.sort(-g, axis=1)[:, :4]
    np.testing.assert_allclose(sims, ref, atol=1e-6)
    assert not np.any(idx == np.arange(12)[:, None])
    np.testing.assert_allclose(np.take_along_axis(g, idx, 1), sims, atol=1e-6)


def test_topk_bounds():
    c = _unit(np.random.default_rng(3), 4, 3)
    with pytest.raises(ValueError, match="expected 0 <= l <= 3"):
        topk_inner_product(c, c, 4, exclude_self=True)
    sims, idx = topk_inner_product(c, c, 4)
    np.testing.assert_array_equal(idx[:, 0], np.arange(4))  # self is the nearest when allowed


@pytest.mark.parametrize("block", [1, 7, 100])
def test_clipped_row_col_sums(block):
    rng = np.random.default_rng(4)
    a, b = _unit(rng, 30, 4), _unit(rng, 25, 4)
    s = np.maximum(a @ b.T, 0)
    row, col = clipped_row_col_sums(a, b, block=block)
    np.testing.assert_allclose(row, s.sum(1), atol=1e-5)
    np.testing.assert_allclose(col, s.sum(0), atol=1e-5)


def test_rowwise_dot_and_errors():
    a = np.array([[1, 2], [3, 4]], np.float32)
    np.testing.assert_allclose(rowwise_dot(a, a), [5, 25])
    with pytest.raises(ValueError, match="shapes differ"):
        rowwise_dot(a, a[:1])
    with pytest.raises(ValueError, match="block: got 0"):
        max_sim_to_earlier(a, block=0)


def test_max_sim_to_earlier_blocked_matches_on_a_memmap(tmp_path):
    from curation.select.similarity import max_sim_to_earlier, max_sim_to_earlier_blocked

    rng = np.random.default_rng(3)
    x = rng.standard_normal((257, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    got = max_sim_to_earlier_blocked(mm, block=50)
    ref = max_sim_to_earlier(x)
    assert got[0] == -1.0
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # hand check of one row: the max over strictly earlier rows
    assert got[100] == pytest.approx(float((x[:100] @ x[100]).max()), abs=1e-6)
