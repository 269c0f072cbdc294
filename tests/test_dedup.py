"""SemDeDup: order (cos ascending, ties by uid), earlier members count, eps direction."""

import numpy as np
import pytest

from curation.select.semdedup import EPS_GRID, is_duplicate, removed_fraction, semdedup_scores


def _norm(a):
    a = np.asarray(a, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_order_by_cos_ascending_and_earlier_removed_members_count():
    # One cluster; order by cos: rows 2 (0.1), 0 (0.5), 1 (0.7), 3 (0.9).
    x = _norm([[1, 0.05, 0], [1, 0.1, 0], [1, 0, 0], [0, 1, 0]])
    cid = np.zeros(4, np.int32)
    cos = np.array([0.5, 0.7, 0.1, 0.9], np.float32)
    uids = ["a", "b", "c", "d"]
    m = semdedup_scores(x, cid, cos, uids)
    g = x @ x.T
    assert m[2] == -1.0
    assert m[0] == pytest.approx(g[0, 2], abs=1e-6)
    # row 1 is compared with rows 2 AND 0 (row 0 is itself a duplicate of row 2; it still counts)
    assert m[1] == pytest.approx(max(g[1, 2], g[1, 0]), abs=1e-6)
    assert m[1] == pytest.approx(g[1, 0], abs=1e-6) and g[1, 0] > g[1, 2]
    assert m[3] == pytest.approx(g[3, [0, 1, 2]].max(), abs=1e-6)


def test_ties_broken_by_uid():
    x = _norm([[1, 0], [1, 0.2]])
    cos = np.array([0.5, 0.5], np.float32)
    m = semdedup_scores(x, np.zeros(2), cos, ["b", "a"])  # uid "a" (row 1) comes first
    assert m[1] == -1.0 and m[0] == pytest.approx(float(x[0] @ x[1]), abs=1e-6)


def test_clusters_are_independent():
    x = _norm([[1, 0], [1, 0], [0, 1]])
    m = semdedup_scores(x, np.array([0, 1, 1]), np.array([1.0, 1.0, 0.0]), ["a", "b", "c"])
    # rows 0 and 1 are identical but in different clusters
    np.testing.assert_allclose(m, [-1.0, 0.0, -1.0], atol=1e-6)


def test_eps_direction_larger_removes_more():
    m = np.array([-1.0, 0.5, 0.96, 0.995, 0.999])
    np.testing.assert_array_equal(is_duplicate(m, 0.01), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(is_duplicate(m, 0.05), [0, 0, 1, 1, 1])
    fr = removed_fraction(m)
    assert list(fr) == list(EPS_GRID)
    vals = [fr[e] for e in EPS_GRID]
    assert vals == sorted(vals) and fr[0.05] == pytest.approx(0.6)
    assert is_duplicate(np.array([0.95]), 0.05).tolist() == [False]  # strict: M > 1 - eps


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocked_equals_dense(block):
    rng = np.random.default_rng(0)
    x = _norm(rng.standard_normal((60, 8)))
    cid = rng.integers(0, 3, 60)
    cos = rng.random(60).astype(np.float32)
    uids = [f"{i:04d}" for i in range(60)]
    got = semdedup_scores(x, cid, cos, uids, block=block)
    ref = np.full(60, -1.0)
    for c in range(3):
        mem = np.flatnonzero(cid == c)
        mem = mem[np.argsort(cos[mem], kind="stable")]
        for j in range(1, len(mem)):
            ref[mem[j]] = (x[mem[:j]] @ x[mem[j]]).max()
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_length_mismatch():
    with pytest.raises(ValueError, match="expected all equal"):
        semdedup_scores(np.zeros((2, 2), np.float32), [0], [0.0, 0.0], ["a", "b"])
