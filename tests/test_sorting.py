"""lex_order is np.lexsort, faster: the same permutation on every kind of key, ties included."""

import numpy as np
import pytest

from curation.engine.sorting import lex_order


def _cases(rng, n):
    c = rng.integers(0, 50, n)
    cos32 = rng.random(n).astype(np.float32)
    cos32[rng.integers(0, n, n // 20)] = cos32[0]  # ties in the score
    hi = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    lo = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    f64 = rng.standard_normal(n)
    f64[: n // 10] = -0.0
    f64[n // 10 : n // 5] = 0.0
    f64[rng.integers(0, n, 5)] = np.nan
    f64[rng.integers(0, n, 5)] = -np.inf
    f64[rng.integers(0, n, 5)] = np.inf
    yield "cluster, float32 score", (cos32.astype(np.float64), c)
    yield "cluster, -score", (-cos32.astype(np.float64), c)
    yield "uid halves", (lo, hi)
    yield "uid halves, high half tied in groups", (lo, hi % np.uint64(97))
    yield "counter uids (high half constant)", (lo, np.zeros(n, np.uint64))
    yield "float64 with -0.0, nan, inf", (f64,)
    f32 = f64.astype(np.float32)  # -0.0, nan, +-inf and negatives kept, as float32 keys
    yield "float32 with -0.0, nan, inf", (f32,)
    yield "cluster, float32 score as float32", (cos32, c)
    yield "cluster, -score as float32", (-cos32, c)
    yield "three keys, negative ints", (rng.integers(-5, 5, n), f64, rng.integers(-(2**62), 2**62, n))
    yield "int64 extremes", (np.r_[np.iinfo(np.int64).min, np.iinfo(np.int64).max, rng.integers(-3, 3, n - 2)],)
    yield "pos, cluster (unique pairs)", (rng.permutation(n), c)
    yield "bool and uint8", (rng.random(n) < 0.5, rng.integers(0, 3, n).astype(np.uint8))


@pytest.mark.parametrize("n", [10, 3000, 50_000])
def test_lex_order_equals_lexsort(n):
    rng = np.random.default_rng(n)
    for name, keys in _cases(rng, n):
        got = lex_order(keys)
        assert got.dtype == np.int64
        assert np.array_equal(got, np.lexsort(keys)), name


def test_lex_order_packs_the_row_number_where_it_fits(monkeypatch):
    """A key of few bits sorts its values with the row number in the low bits (no argsort), a
    64-bit key takes argsort; both equal lexsort, ties on the first word included."""
    import curation.engine.sorting as S

    rng = np.random.default_rng(5)
    n = 40_000
    calls = []
    real = np.argsort
    monkeypatch.setattr(S.np, "argsort", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = (rng.random(n).astype(np.float32), rng.integers(0, 1000, n))  # 32 + 10 bits
    tied = (rng.standard_normal(n), rng.integers(0, 3, n))  # two words (2 + 64 bits), the first of 2 bits
    for keys in (small, tied):
        assert np.array_equal(S.lex_order(keys), np.lexsort(keys))
    assert not calls
    wide = (rng.standard_normal(n),)  # float64: 64 bits, no room for the row number
    assert np.array_equal(S.lex_order(wide), np.lexsort(wide)) and calls


def test_lex_order_stable_on_all_equal_keys():
    keys = (np.ones(5000), np.zeros(5000, np.int32))
    assert np.array_equal(lex_order(keys), np.arange(5000))


def test_lex_order_rejects_no_keys():
    with pytest.raises(ValueError, match="no keys"):
        lex_order([])
