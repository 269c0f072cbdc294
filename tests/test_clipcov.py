"""CLIP score filter and CLIPCov: brute-force optimum, gain bookkeeping, exact vs factorized."""

import itertools

import numpy as np
import pytest

from curation.select.budgets import ssp_budgets
from curation.select.clipcov import (
    clip_scores,
    clipcov_greedy,
    clipcov_objective,
    clipcov_select,
    top_by_score,
)


def _norm(a):
    a = np.asarray(a, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _pair_class():
    # Samples 0/1 are near-duplicates with the best alignment, 2/3 near-duplicates below them.
    x = _norm([[1, 0.02, 0, 0], [1, 0, 0.02, 0], [0, 1, 0, 0.05], [0, 1, 0.05, 0]])
    y = _norm([[1, 0, 0, 0], [1, 0, 0, 0], [0.3, 1, 0.4, 0], [0.3, 1, 0, 0.4]])
    return x, y


def _class(seed, n=40, d=8, noise=0.4):
    rng = np.random.default_rng(seed)
    x = _norm(rng.standard_normal((n, d)))
    y = _norm(x + noise * rng.standard_normal((n, d)))
    return x, y


def test_clip_scores():
    x = _norm([[1, 0], [0, 1]])
    y = _norm([[1, 1], [0, 1]])
    np.testing.assert_allclose(clip_scores(x, y), [np.sqrt(0.5), 1.0], atol=1e-6)


def test_top_by_score_fraction_threshold_and_ties():
    s = np.array([0.2, 0.9, 0.5, 0.9])
    np.testing.assert_array_equal(top_by_score(s, ["a", "d", "c", "b"], n_keep=2), [3, 1])  # tie by uid b < d
    np.testing.assert_array_equal(sorted(top_by_score(s, ["a", "b", "c", "d"], threshold=0.4)), [1, 2, 3])
    with pytest.raises(ValueError, match="expected exactly one"):
        top_by_score(s, ["a", "b", "c", "d"])


@pytest.mark.parametrize("b", [1, 2, 3])
def test_greedy_matches_brute_force_optimum(b):
    x, y = _pair_class()
    picked, gains = clipcov_greedy(x, y, b)
    best = max(itertools.combinations(range(4), b), key=lambda s: clipcov_objective(x, y, s))
    assert sorted(picked.tolist()) == sorted(best)
    assert clipcov_objective(x, y, picked) == pytest.approx(clipcov_objective(x, y, best))
    # The marginal gains add up to F(S).
    assert gains.sum() == pytest.approx(clipcov_objective(x, y, picked), abs=1e-5)


def test_redundancy_term_changes_the_choice():
    x, y = _pair_class()
    picked, _ = clipcov_greedy(x, y, 2)
    # Without the redundancy update the two best-aligned near-duplicates (0, 1) would be picked.
    assert sorted(picked.tolist()) == [0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gains_sum_to_objective_random_classes(seed):
    x, y = _class(seed, n=12, d=5, noise=1.0)
    picked, gains = clipcov_greedy(x, y, 7)
    assert len(set(picked.tolist())) == 7
    assert gains.sum() == pytest.approx(clipcov_objective(x, y, picked), abs=1e-4)
    assert np.all(np.diff(gains) <= 1e-6)  # s >= 0: exact gains never increase


def test_streamed_exact_equals_dense():
    x, y = _class(3, n=60, noise=0.8)
    dense = clipcov_greedy(x, y, 25)
    streamed = clipcov_greedy(x, y, 25, max_dense=10, large="exact", block=7)
    np.testing.assert_array_equal(dense[0], streamed[0])
    np.testing.assert_allclose(dense[1], streamed[1], atol=1e-5)


def test_factorized_agrees_with_exact_when_no_clipping():
    # All cross similarities positive: max(0, .) is the identity and both forms coincide.
    rng = np.random.default_rng(4)
    base = np.zeros(8, np.float32)
    base[0] = 3.0
    x = _norm(base + 0.5 * rng.standard_normal((30, 8)))
    y = _norm(x + 0.1 * rng.standard_normal((30, 8)))
    assert (x @ y.T).min() > 0
    exact, g_exact = clipcov_greedy(x, y, 12)
    fact, g_fact = clipcov_greedy(x, y, 12, factorized=True)
    np.testing.assert_array_equal(exact, fact)
    np.testing.assert_allclose(g_exact, g_fact, atol=1e-5)
    assert g_fact.sum() == pytest.approx(clipcov_objective(x, y, fact, factorized=True), abs=1e-4)


@pytest.mark.parametrize("seed", [5, 6])
def test_factorized_close_to_exact_on_small_classes(seed):
    x, y = _class(seed, n=80, noise=0.5)
    exact, _ = clipcov_greedy(x, y, 40)
    fact, _ = clipcov_greedy(x, y, 40, factorized=True)
    batched, _ = clipcov_greedy(x, y, 40, factorized=True, batch=4)
    overlap = len(set(exact.tolist()) & set(fact.tolist())) / 40
    assert overlap >= 0.75, overlap
    f_exact = clipcov_objective(x, y, exact)
    assert clipcov_objective(x, y, fact) >= 0.97 * f_exact
    assert clipcov_objective(x, y, batched) >= 0.95 * f_exact


def test_clipcov_select_same_fraction_per_class():
    rng = np.random.default_rng(7)
    x, y = _class(7, n=50)
    cls = rng.integers(0, 4, 50)
    uids = [f"{i:03d}" for i in range(50)]
    kept, pos, gain = clipcov_select(x, y, cls, uids, 20)
    assert len(set(kept.tolist())) == 20
    sizes = np.bincount(cls, minlength=4)
    np.testing.assert_array_equal(np.bincount(cls[kept], minlength=4), ssp_budgets(sizes, 20))
    # the greedy inside a class sees members in uid order: same as calling it directly
    c0 = np.flatnonzero(cls == 0)
    p0, _ = clipcov_greedy(x[c0], y[c0], int(ssp_budgets(sizes, 20)[0]))
    np.testing.assert_array_equal(kept[cls[kept] == 0], c0[p0])


def test_errors():
    x, y = _class(0, n=5)
    with pytest.raises(ValueError, match="n_pick: got 6"):
        clipcov_greedy(x, y, 6)
    with pytest.raises(ValueError, match="large: got 'fast'"):
        clipcov_greedy(x, y, 2, large="fast")
    with pytest.raises(ValueError, match="expected equal shapes"):
        clipcov_greedy(x, y[:3], 2)


def test_clipcov_select_on_a_row_subset_gathers_per_class():
    x, y = _class(8, n=60)
    cls = np.random.default_rng(8).integers(0, 3, 60)
    uids = np.array([f"{i:03d}" for i in range(60)])
    rows = np.arange(0, 60, 2)
    a = clipcov_select(x, y, cls[rows], uids[rows], 10, rows=rows)
    b = clipcov_select(x[rows], y[rows], cls[rows], uids[rows], 10)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
