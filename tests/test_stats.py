"""The paired test over seeds, against hand-computed cases (df = 2 has a closed-form t CDF)."""

from __future__ import annotations

import math

import pytest

from curation.evaluate.stats import paired_compare, paired_t_test, significance_mark


def t_cdf_df2(t: float) -> float:
    # Student t with 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_paired_t_by_hand():
    # d = [0.2, 0.2, 0.1]: mean 1/6, sd(ddof=1) = sqrt(1/300), se = sd / sqrt(3) = 1/30, t = 5
    t, p = paired_t_test([0.3, 0.4, 0.5], [0.1, 0.2, 0.4])
    assert t == pytest.approx(5.0)
    assert p == pytest.approx(2 * (1 - t_cdf_df2(5.0)))  # 0.03775
    assert significance_mark(p) == "*"


def test_noise_is_not_significant():
    # d = [0.1, -0.05, 0.02]: mean 0.0233, sd 0.0752, t = 0.537 -> p ~ 0.645
    t, p = paired_t_test([0.5, 0.45, 0.52], [0.4, 0.5, 0.5])
    d = [0.1, -0.05, 0.02]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    assert t == pytest.approx(m / (sd / math.sqrt(3)))
    assert p == pytest.approx(2 * (1 - t_cdf_df2(abs(t))))
    assert p > 0.5 and significance_mark(p) == "~"


def test_sign_of_t_follows_a_minus_b():
    t, p = paired_t_test([0.1, 0.2, 0.4], [0.3, 0.4, 0.5])
    assert t == pytest.approx(-5.0) and p == pytest.approx(2 * (1 - t_cdf_df2(5.0)))


def test_degenerate_cases():
    assert paired_t_test([0.1], [0.2]) == (None, None)
    assert paired_t_test([0.3, 0.4], [0.2, 0.3]) == (None, 0.0)  # identical nonzero differences
    assert paired_t_test([0.3, 0.4], [0.3, 0.4]) == (None, 1.0)
    with pytest.raises(ValueError, match="expected two equal 1-d arrays"):
        paired_t_test([0.1, 0.2], [0.1])
    assert significance_mark(None) == "n/a" and significance_mark(0.001) == "**" and significance_mark(0.05) == "~"


def test_paired_compare_uses_shared_seeds_only():
    a = {0: 0.3, 1: 0.4, 2: 0.5, 7: 9.9}
    b = {0: 0.1, 1: 0.2, 2: 0.4, 5: 0.0}
    r = paired_compare(a, b)
    assert r.seeds == (0, 1, 2) and r.n == 3
    assert r.mean_diff == pytest.approx(1 / 6) and r.std_diff == pytest.approx(math.sqrt(1 / 300))
    assert r.significant and r.mark == "*"
    none = paired_compare({0: 1.0}, {1: 1.0})
    assert none.n == 0 and none.p is None and none.mark == "n/a"
