"""Statistics over training seeds: is a difference between two recipes signal or noise?

Two recipes trained with the same seeds form PAIRS (seed ``s`` of recipe A and seed ``s`` of
recipe B share the model init and the data-order generator), so the test is the paired
t-test on the per-seed differences ``d_s = a_s - b_s`` (``scipy.stats.ttest_rel``, two-sided):

    t = mean(d) / (std(d, ddof=1) / sqrt(n)),   df = n - 1

With 3 seeds (df = 2) a difference is significant at 0.05 only when it is large relative to
its seed-to-seed spread (|t| > 4.30). When every ``d_s`` is identical the spread is zero:
the test returns ``p = 0`` for a nonzero mean difference and ``p = 1`` when all are zero.
Fewer than 2 pairs give no test (``p = None``: "n/a").

Marks used in the report: ``**`` p < 0.01, ``*`` p < 0.05, ``~`` within noise (p >= 0.05),
``n/a`` no test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
TEST_NAME = "two-sided paired t-test over training seeds (scipy.stats.ttest_rel), alpha 0.05"


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of two recipes over shared seeds.

    Attributes:
        n: number of shared seeds (pairs).
        mean_diff: mean of ``a_s - b_s``.
        std_diff: sample std (ddof=1) of the differences (0 with one pair).
        t: the t statistic, or None (fewer than 2 pairs, or zero spread).
        p: two-sided p-value, or None when there is no test (fewer than 2 pairs).
        seeds: the shared seeds, sorted.
    """

    n: int
    mean_diff: float
    std_diff: float
    t: float | None
    p: float | None
    seeds: tuple[int, ...]

    @property
    def significant(self) -> bool:
        """True when ``p < ALPHA``."""
        return self.p is not None and self.p < ALPHA

    @property
    def mark(self) -> str:
        """``**`` (p < 0.01), ``*`` (p < 0.05), ``~`` (within noise) or ``n/a``."""
        return significance_mark(self.p)


def significance_mark(p: float | None) -> str:
    """The report's mark for a p-value: ``**`` < 0.01, ``*`` < 0.05, ``~`` otherwise, ``n/a`` for None."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if p < 0.01:
        return "**"
    if p < ALPHA:
        return "*"
    return "~"


def paired_t_test(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> tuple[float | None, float | None]:
    """Two-sided paired t-test of equal means.

    Args:
        a: (n,) float values of recipe A, one per seed.
        b: (n,) float values of recipe B for the same seeds, same order.

    Returns:
        ``(t, p)``; ``(None, None)`` when ``n < 2``; ``(None, 0.0)`` when the differences are
        identical and nonzero, ``(None, 1.0)`` when they are all zero.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_t_test: got shapes {a.shape} and {b.shape}; expected two equal 1-d arrays")
    n = a.size
    if n < 2:
        return None, None
    d = a - b
    sd = float(np.std(d, ddof=1))
    if sd <= 1e-15 * max(1.0, float(np.max(np.abs(d)))):
        return None, (1.0 if np.all(np.abs(d) <= 1e-15) else 0.0)
    from scipy import stats

    res = stats.ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue)


def paired_compare(a: Mapping[int, float], b: Mapping[int, float]) -> PairedResult:
    """Compare recipe A with recipe B over the seeds both have.

    Args:
        a: seed -> value of recipe A.
        b: seed -> value of recipe B.

    Returns:
        A :class:`PairedResult` over the shared seeds (``n = 0`` and ``nan`` mean when none).
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return PairedResult(0, float("nan"), float("nan"), None, None, ())
    x = np.array([a[s] for s in seeds], dtype=np.float64)
    y = np.array([b[s] for s in seeds], dtype=np.float64)
    d = x - y
    t, p = paired_t_test(x, y)
    return PairedResult(
        n=len(seeds),
        mean_diff=float(d.mean()),
        std_diff=float(np.std(d, ddof=1)) if len(seeds) > 1 else 0.0,
        t=t,
        p=p,
        seeds=seeds,
    )


__all__ = ["ALPHA", "TEST_NAME", "PairedResult", "paired_compare", "paired_t_test", "significance_mark"]
