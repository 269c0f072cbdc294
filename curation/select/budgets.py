"""Per-cluster budgets (DBP water-filling, SSP) and the shared in-cluster ordering.

ALGORITHMS.md sections 4 and 5:

* DBP (density-based pruning, Abbas et al. 2024): keep ``N_keep = round(f * N_pool)``;
  cluster ``j`` gets ``x_j = clip(N_keep * p_j + lambda, lb_j, ub_j)`` with the scalar
  ``lambda`` found by bisection so that ``sum x = N_keep`` (the exact solution of the
  reference's QP ``min 1/2 ||x||^2 - (N_keep p)^T x s.t. sum x = N_keep, lb <= x <= ub``),
  then :func:`largest_remainder` rounding so the integer total is EXACTLY ``N_keep`` and the
  bounds hold. ``ub_j = |C_j|``, ``lb_j = min(floor(balance * N_keep / k), |C_j|)``.
* SSP (self-supervised prototype pruning): the same fraction in every cluster,
  ``x_j = f * |C_j|`` with largest-remainder rounding.

Shared steps, one function each: :func:`n_keep_for` (half-up rounding),
:func:`largest_remainder`, :func:`in_cluster_order` (least prototypical first by default)
and :func:`take_per_cluster` (first ``x_j`` members of each cluster in that order).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from curation.engine.sorting import lex_order
from curation.ingest.ids import uid_series

ORDERS = ("hard", "easy", "random")


def n_keep_for(keep_fraction: float, n_pool: int) -> int:
    """``round(keep_fraction * n_pool)`` with halves rounded up (Python's ``round`` is banker's)."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction: got {keep_fraction}; expected 0 <= f <= 1")
    if n_pool < 0:
        raise ValueError(f"n_pool: got {n_pool}; expected >= 0")
    return min(int(n_pool), int(math.floor(keep_fraction * n_pool + 0.5)))


def largest_remainder(x: np.ndarray, total: int, lb: np.ndarray | None = None, ub: np.ndarray | None = None) -> np.ndarray:
    """Round real allocations to integers summing EXACTLY to ``total`` within bounds.

    Floors every ``x_j`` (clipped to ``[lb_j, ub_j]``), then hands the missing units one each
    to the entries with the largest fractional remainders (ties: lower index first) that
    are still below ``ub``; a surplus (only possible through floating-point error) is
    taken back from the smallest remainders above ``lb``.

    Args:
        x: (k,) real allocations, normally already within the bounds.
        total: the integer total to hit.
        lb: (k,) integer lower bounds (default 0).
        ub: (k,) integer upper bounds (default +inf).

    Returns:
        (k,) int64 with ``lb <= out <= ub`` and ``out.sum() == total``.

    Raises:
        ValueError: if ``sum(lb) <= total <= sum(ub)`` does not hold.
    """
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[0]
    lb_a = np.zeros(k, dtype=np.int64) if lb is None else np.asarray(lb, dtype=np.int64)
    ub_a = np.full(k, np.iinfo(np.int64).max // 4, dtype=np.int64) if ub is None else np.asarray(ub, dtype=np.int64)
    if np.any(lb_a > ub_a):
        raise ValueError("bounds: got lb > ub for some entries; expected lb <= ub")
    if not lb_a.sum() <= total <= ub_a.sum():
        raise ValueError(f"total: got {total}; expected {int(lb_a.sum())} <= total <= {int(ub_a.sum())}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x: got non-finite allocations; expected finite values")
    xc = np.clip(x, lb_a, ub_a)
    out = np.floor(xc).astype(np.int64)
    rem = xc - out
    deficit = int(total - out.sum())
    idx = np.arange(k)
    if deficit > 0:
        cand = idx[out < ub_a]
        # Largest remainder first; stable on index for ties. Entries with zero remainder come
        # last and only receive units if floating-point error left more units than remainders.
        order = cand[np.lexsort((cand, -rem[cand]))]
        while deficit > 0:
            room = ub_a[order] - out[order]
            step = order[room > 0][:deficit]
            out[step] += 1
            deficit -= step.size
            order = order[ub_a[order] - out[order] > 0]
    elif deficit < 0:
        cand = idx[out > lb_a]
        order = cand[np.lexsort((cand, rem[cand]))]
        while deficit < 0:
            room = out[order] - lb_a[order]
            step = order[room > 0][: -deficit]
            out[step] -= 1
            deficit += step.size
            order = order[out[order] - lb_a[order] > 0]
    return out


def water_filling(target: np.ndarray, total: float, lb: np.ndarray, ub: np.ndarray, iters: int = 200) -> np.ndarray:
    """Solve ``min 1/2||x||^2 - target^T x  s.t.  sum x = total, lb <= x <= ub``.

    The KKT conditions give ``x_j = clip(target_j + lambda, lb_j, ub_j)`` for one scalar
    ``lambda``; ``g(lambda) = sum_j x_j(lambda)`` is non-decreasing, so ``lambda`` is found
    by bisection on ``[min(lb - target), max(ub - target)]``.

    Args:
        target: (k,) float, e.g. ``N_keep * p``.
        total: the required sum.
        lb, ub: (k,) bounds.
        iters: bisection steps (float64 converges long before 200).

    Returns:
        (k,) float64 real allocations (sum equal to ``total`` up to float rounding).
    """
    t = np.asarray(target, dtype=np.float64)
    lo_b = np.asarray(lb, dtype=np.float64)
    hi_b = np.asarray(ub, dtype=np.float64)
    if not lo_b.sum() <= total <= hi_b.sum():
        raise ValueError(f"total: got {total}; expected {lo_b.sum()} <= total <= {hi_b.sum()}")
    if t.size == 0:
        return t.copy()
    lo = float(np.min(lo_b - t))
    hi = float(np.max(hi_b - t))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.clip(t + mid, lo_b, hi_b).sum() < total:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            break
    return np.clip(t + hi, lo_b, hi_b)


def dbp_budgets(sizes: np.ndarray, weights: np.ndarray, n_keep: int, balance: float = 0.5) -> np.ndarray:
    """DBP per-cluster budgets (ALGORITHMS.md section 4).

    Args:
        sizes: (k,) int cluster sizes ``|C_j|`` of the pool being pruned.
        weights: (k,) float cluster weights ``p`` (softmax of complexity; renormalized here).
        n_keep: total samples to keep, ``0 <= n_keep <= sum(sizes)``.
        balance: lower-bound factor, ``lb_j = min(floor(balance * n_keep / k), |C_j|)``.

    Returns:
        (k,) int64 budgets with ``lb <= x <= |C|`` and ``x.sum() == n_keep``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    p = np.asarray(weights, dtype=np.float64)
    if sizes.shape != p.shape:
        raise ValueError(f"weights: got shape {p.shape}; expected {sizes.shape} (one per cluster)")
    if np.any(sizes < 0) or np.any(~np.isfinite(p)) or np.any(p < 0):
        raise ValueError("sizes/weights: got negative or non-finite values; expected >= 0")
    if not 0 <= n_keep <= sizes.sum():
        raise ValueError(f"n_keep: got {n_keep}; expected 0 <= n_keep <= {int(sizes.sum())}")
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance: got {balance}; expected 0 <= balance <= 1")
    k = sizes.size
    if k == 0:
        return sizes.copy()
    p = p / p.sum() if p.sum() > 0 else np.full(k, 1.0 / k)
    m = int(math.floor(balance * n_keep / k))
    lb = np.minimum(m, sizes)
    x = water_filling(n_keep * p, n_keep, lb, sizes)
    return largest_remainder(x, n_keep, lb, sizes)


def ssp_budgets(sizes: np.ndarray, n_keep: int) -> np.ndarray:
    """Same keep fraction in every cluster: ``x_j = n_keep / N * |C_j|``, largest remainder.

    Args:
        sizes: (k,) int class/cluster sizes.
        n_keep: total to keep, ``0 <= n_keep <= sum(sizes)``.

    Returns:
        (k,) int64 with ``0 <= x <= |C|`` and ``x.sum() == n_keep``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 <= n_keep <= total:
        raise ValueError(f"n_keep: got {n_keep}; expected 0 <= n_keep <= {total}")
    if total == 0:
        return np.zeros_like(sizes)
    x = sizes * (n_keep / total)
    return largest_remainder(x, n_keep, np.zeros_like(sizes), sizes)


def in_cluster_order(
    cluster_ids: np.ndarray,
    cos_to_centroid: np.ndarray,
    uids,
    order: str = "hard",
    seed: int = 0,
) -> np.ndarray:
    """Indices sorting the pool by cluster, then by the in-cluster keep order.

    ``hard``: cos_to_centroid ascending (least prototypical first; the reference order and
    SemDeDup's); ``easy``: descending; ``random``: a seeded uniform order. Ties (and the
    random order's ties) break by uid, so the result is a pure function of the inputs.

    Args:
        cluster_ids: (n,) int cluster of each sample.
        cos_to_centroid: (n,) float32 cosine to the sample's centroid.
        uids: (n,) str sample uids (array, list or polars Series).
        order: one of ``ORDERS``.
        seed: seed of the ``random`` order.

    Returns:
        (n,) int64 permutation of ``range(n)``.
    """
    if order not in ORDERS:
        raise ValueError(f"order: got {order!r}; expected one of {ORDERS}")
    c = np.asarray(cluster_ids, dtype=np.int64)
    s = np.asarray(cos_to_centroid)
    if s.dtype != np.float32:  # float32 scores sort as they are (the same order, half the bytes)
        s = s.astype(np.float64)
    if order == "easy":
        s = -s
    elif order == "random":
        s = np.random.default_rng(seed).random(c.size)
    s = s + s.dtype.type(0.0)  # -0.0 -> 0.0: one zero for both sorts below
    if isinstance(uids, np.ndarray) and uids.dtype.kind in "SU" and uids.size == c.size and (
            uids.size < 2 or bool(np.all(uids[1:] > uids[:-1]))):
        # uids strictly increasing (pools are read sorted by uid): the uid tie-break is the row
        # order, so a stable sort on (cluster, score) gives the same permutation without the uids
        return lex_order((s, c))
    df = pl.DataFrame({"c": c, "s": s, "u": uid_series(uids)}).with_row_index("i")
    return df.sort(["c", "s", "u"])["i"].to_numpy().astype(np.int64)


def take_per_cluster(ordered_idx: np.ndarray, cluster_ids: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first ``budgets[c]`` members of every cluster ``c`` in the given order.

    Args:
        ordered_idx: (n,) int64 from :func:`in_cluster_order` (grouped by ascending cluster).
        cluster_ids: (n,) int cluster of each sample (indexed by the original position).
        budgets: (k,) int64 members to keep per cluster id ``0..k-1``.

    Returns:
        ``(kept, pos)``: (n_keep,) int64 original indices in the given order, and (n_keep,)
        int64 position of each kept sample within its cluster (0 = first kept).
    """
    c_sorted = np.asarray(cluster_ids, dtype=np.int64)[ordered_idx]
    if c_sorted.size and np.any(np.diff(c_sorted) < 0):
        raise ValueError("ordered_idx: got an order not grouped by ascending cluster id")
    budgets = np.asarray(budgets, dtype=np.int64)
    k = budgets.size
    if c_sorted.size and (c_sorted.min() < 0 or c_sorted.max() >= k):
        raise ValueError(f"cluster_ids: got ids outside [0, {k}); expected one budget per cluster id")
    starts = np.searchsorted(c_sorted, np.arange(k), side="left")
    pos = np.arange(c_sorted.size, dtype=np.int64) - starts[c_sorted]
    keep = pos < budgets[c_sorted]
    sizes = np.bincount(c_sorted, minlength=k)
    if np.any(budgets > sizes):
        raise ValueError("budgets: got a budget above its cluster size; expected budgets <= sizes")
    return ordered_idx[keep], pos[keep]
