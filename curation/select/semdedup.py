"""SemDeDup: semantic near-duplicate scores within concept clusters (ALGORITHMS.md section 2).

Within each cluster, members are ordered by ``cos_to_centroid`` ascending (least
prototypical first; ties by uid, :func:`curation.select.budgets.in_cluster_order` with ``hard``).
For the member at position ``j``: ``M_j = max_{i<j} cos(x_i, x_j)`` (``-1`` for the first),
whether or not the earlier members are themselves removed. A sample is a duplicate at
threshold ``eps`` when ``M_j > 1 - eps``: a larger eps removes MORE. ``M`` is stored once
(the ``dedup_scores`` table) so any eps is a filter, not a recomputation.

Memory: each cluster is processed with :func:`curation.select.similarity.max_sim_to_earlier` in
row blocks, so the peak extra memory is ``O(block * n_cluster)`` plus one gathered copy of
the cluster's rows.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from curation.select.budgets import in_cluster_order
from curation.select.similarity import DEFAULT_BLOCK, max_sim_to_earlier, single_thread_blas
from curation.engine.executor import Executor, chunk_groups

log = logging.getLogger(__name__)

EPS_GRID = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1)


def cluster_member_groups(
    n: int,
    cluster_ids: np.ndarray,
    cos_to_centroid: np.ndarray,
    uids,
    min_size: int = 1,
) -> list[np.ndarray]:
    """The members of every cluster, each in SemDeDup order (least prototypical first).

    Args:
        n: number of samples (rows of the embedding matrix).
        cluster_ids: (n,) int cluster of each sample.
        cos_to_centroid: (n,) float32 cosine of each sample to its centroid.
        uids: (n,) str uids (tie-break of the order).
        min_size: drop clusters with fewer members (SemDeDup needs 2).

    Returns:
        One (n_c,) int64 array of row indices per cluster, ascending cluster id.
    """
    if not (len(cluster_ids) == len(cos_to_centroid) == len(uids) == n):
        raise ValueError(
            f"lengths: got x={n}, cluster_ids={len(cluster_ids)}, cos={len(cos_to_centroid)}, "
            f"uids={len(uids)}; expected all equal"
        )
    order = in_cluster_order(cluster_ids, cos_to_centroid, uids, order="hard")
    c_sorted = np.asarray(cluster_ids, dtype=np.int64)[order]
    bounds = np.flatnonzero(np.diff(c_sorted)) + 1
    return [g for g in np.split(order, bounds) if len(g) >= min_size]


def semdedup_scores(
    x: np.ndarray,
    cluster_ids: np.ndarray,
    cos_to_centroid: np.ndarray,
    uids,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """``M_j`` of every sample, in the input row order.

    Args:
        x: (n, d) float32 unit-norm embeddings.
        cluster_ids: (n,) int cluster of each sample.
        cos_to_centroid: (n,) float32 cosine of each sample to its centroid.
        uids: (n,) str uids (tie-break of the order).
        block: rows per block inside a cluster.

    Returns:
        (n,) float32 max cosine to an earlier member of the same cluster (-1 for the first).
    """
    n = x.shape[0]
    out = np.full(n, -1.0, dtype=np.float32)
    with single_thread_blas():  # the same bits on any number of cores (see max_sim_to_earlier)
        for members in cluster_member_groups(n, cluster_ids, cos_to_centroid, uids, min_size=2):
            out[members] = max_sim_to_earlier(x[members], block=block)
    return out


def is_duplicate(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """(n,) bool: ``M > 1 - eps`` (duplicate at threshold eps; larger eps removes more)."""
    if not 0.0 <= eps <= 2.0:
        raise ValueError(f"eps: got {eps}; expected 0 <= eps <= 2")
    return np.asarray(max_sim) > (1.0 - eps)


def removed_fraction(max_sim: np.ndarray, eps_grid: Iterable[float] = EPS_GRID) -> dict[float, float]:
    """Fraction of samples removed at each eps of the grid, ``{eps: fraction}``."""
    m = np.asarray(max_sim)
    if m.size == 0:
        return {float(e): 0.0 for e in eps_grid}
    return {float(e): float(is_duplicate(m, e).mean()) for e in eps_grid}


# --------------------------------------------------------------------------------------
# The same, with the work spread over an executor (in process or on Ray)
# --------------------------------------------------------------------------------------


def _semdedup_chunk(chunk: list[np.ndarray], x: np.ndarray, block: int) -> list[np.ndarray]:
    """Per-cluster SemDeDup for a chunk of clusters: ``M`` of each cluster's members, which
    arrive already in the SemDeDup order (:func:`curation.select.similarity.max_sim_to_earlier`)."""

    with single_thread_blas():  # the same bits as the in-process loop, whatever the worker's cores
        return [max_sim_to_earlier(x[members], block=block) for members in chunk]


def semdedup_scores_distributed(
    executor: Executor,
    x: np.ndarray,
    cluster_ids: np.ndarray,
    cos_to_centroid: np.ndarray,
    uids,
    block: int | None = None,
    rows_per_task: int = 50_000,
) -> np.ndarray:
    """:func:`curation.select.semdedup.semdedup_scores` with the clusters spread over ``executor``.

    The in-cluster order is :func:`curation.select.budgets.in_cluster_order` (``hard``), the same
    as the in-process function; ``x`` is shared once (``ray.put``) and each task receives
    only member indices. The result is identical to ``semdedup_scores`` (parity-tested).

    Args:
        executor: from :func:`make_executor`.
        x: (n, d) float32 unit-norm embeddings.
        cluster_ids: (n,) int; cos_to_centroid: (n,) float32; uids: (n,) str.
        block: rows per similarity block inside a cluster (default: the library's).
        rows_per_task: clusters are packed into tasks of about this many rows.

    Returns:
        (n,) float32 max cosine to an earlier member of the same cluster (-1 for the first).
    """

    if executor.kind == "in-process":  # the reference loop itself, no chunking
        return semdedup_scores(x, cluster_ids, cos_to_centroid, uids, block=block or DEFAULT_BLOCK)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    groups = cluster_member_groups(n, cluster_ids, cos_to_centroid, uids, min_size=2)
    out = np.full(n, -1.0, dtype=np.float32)
    if not groups:
        return out
    chunks = chunk_groups(groups, [len(g) for g in groups], rows_per_task)
    results = executor.map(_semdedup_chunk, chunks, shared={"x": x}, block=block or DEFAULT_BLOCK)
    for chunk, res in zip(chunks, results):
        for members, m in zip(chunk, res):
            out[members] = m
    return out
