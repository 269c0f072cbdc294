"""CLIP-score filtering and CLIPCov subsets (ALGORITHMS.md sections 6 and 7).

Both need ALIGNED image/caption embeddings (one CLIP space): ``x_a`` image, ``y_a``
caption, (n, d) float32 unit norm.

* CLIP score: ``score_a = cos(x_a, y_a)``; keep the top fraction or all above a threshold.
* CLIPCov (Joshi et al. 2024, "Data-efficient contrastive language-image pretraining:
  prioritizing data quality over quantity"): within a proxy class ``V`` (``|V| = n``),
  ``s_ab = max(0, cos(x_a, y_b))``, ``c_a = cos(x_a, y_a)``, greedily maximize

      F(S) = sum_{a in S} (u_a + 2 c_a) - (1/n) sum_{a != b in S} s_ab,
      u_a  = (1/n) sum_{b in V} (s_ab + s_ba).

  The marginal gain of ``a`` is ``u_a + 2 c_a - (1/n) sum_{b in S} (s_ab + s_ba)``; after
  picking ``b`` every remaining gain drops by ``(s_ab + s_ba) / n`` (vectorized update).
  Exact form: a dense ``n x n`` similarity tile when ``n <= max_dense``; otherwise the two
  needed similarity vectors are recomputed per pick (memory ``O(n)``) or, with
  ``large="factorized"`` (default), the factorized approximation drops the ``max(0, .)``
  so every sum over V or S becomes a dot product with a summed vector
  (``sum_b s_ab ~ x_a . sum_b y_b``), ``O(n d)`` per gain refresh, refreshed every
  ``batch`` picks.
* Budget per class: the same keep fraction in every class (largest remainder,
  :func:`curation.select.budgets.ssp_budgets`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import polars as pl

from curation.ingest.ids import uid_series
from curation.select.budgets import ssp_budgets
from curation.select.similarity import DEFAULT_BLOCK, clipped_row_col_sums, rowwise_dot
from curation.engine.executor import Executor, chunk_groups

log = logging.getLogger(__name__)

LARGE_MODES = ("factorized", "exact")
DEFAULT_MAX_DENSE = 4096


def clip_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """(n,) float32 ``cos(image_a, caption_a)`` for aligned unit-norm (n, d) float32 inputs."""
    return rowwise_dot(img, txt)


def _uid_series(uids) -> pl.Series:
    return uid_series(uids)


def top_by_score(scores: np.ndarray, uids, n_keep: int | None = None, threshold: float | None = None) -> np.ndarray:
    """Indices of the highest scores: the top ``n_keep`` or all with ``score > threshold``.

    Ties break by uid, so the selection is deterministic. Exactly one of ``n_keep`` and
    ``threshold`` must be given.

    Returns:
        (m,) int64 indices ordered by score descending.
    """
    if (n_keep is None) == (threshold is None):
        raise ValueError("top_by_score: got both or neither of n_keep/threshold; expected exactly one")
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores: got NaN; expected finite scores")
    df = pl.DataFrame({"s": -scores, "u": _uid_series(uids)}).with_row_index("i")
    order = df.sort(["s", "u"])["i"].to_numpy().astype(np.int64)
    if threshold is not None:
        return order[scores[order] > threshold]
    if not 0 <= n_keep <= scores.size:
        raise ValueError(f"n_keep: got {n_keep}; expected 0 <= n_keep <= {scores.size}")
    return order[:n_keep]


def clipcov_objective(img: np.ndarray, txt: np.ndarray, subset, factorized: bool = False) -> float:
    """``F(S)`` of one class by its definition (for tests and reports; O(n^2 d)).

    Args:
        img, txt: (n, d) float32 aligned unit-norm embeddings of the class ``V``.
        subset: indices of ``S``.
        factorized: drop the ``max(0, .)`` clip (the objective the approximation optimizes).
    """
    x = np.asarray(img, dtype=np.float64)
    y = np.asarray(txt, dtype=np.float64)
    n = x.shape[0]
    s = x @ y.T
    if not factorized:
        s = np.maximum(s, 0.0)
    u = (s.sum(1) + s.sum(0)) / n
    c = (x * y).sum(1)
    idx = np.asarray(list(subset), dtype=np.int64)
    sub = s[np.ix_(idx, idx)]
    red = sub.sum() - np.trace(sub)
    return float((u[idx] + 2 * c[idx]).sum() - red / n)


def clipcov_greedy(
    img: np.ndarray,
    txt: np.ndarray,
    n_pick: int,
    max_dense: int = DEFAULT_MAX_DENSE,
    large: str = "factorized",
    factorized: bool = False,
    batch: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy CLIPCov picks within one class.

    Args:
        img, txt: (n, d) float32 aligned unit-norm embeddings of the class.
        n_pick: picks, ``0 <= n_pick <= n``.
        max_dense: largest ``n`` for the dense ``n x n`` exact form.
        large: for ``n > max_dense``: ``factorized`` (approximation) or ``exact``
            (similarities recomputed per pick, memory ``O(n)``).
        factorized: force the factorized approximation at any size.
        batch: factorized form only: picks per gain refresh (default
            ``max(1, ceil(n_pick / 256))`` for large classes, 1 when forced on small ones).
        block: rows per block of the coverage sums.

    Returns:
        ``(picked, gains)``: (n_pick,) int64 class-local indices in pick order and (n_pick,)
        float64 marginal gain of each pick when it was made.
    """
    if large not in LARGE_MODES:
        raise ValueError(f"large: got {large!r}; expected one of {LARGE_MODES}")
    x = np.ascontiguousarray(img, dtype=np.float32)
    y = np.ascontiguousarray(txt, dtype=np.float32)
    if x.shape != y.shape:
        raise ValueError(f"img/txt: got shapes {x.shape} and {y.shape}; expected equal shapes")
    n = x.shape[0]
    if not 0 <= n_pick <= n:
        raise ValueError(f"n_pick: got {n_pick}; expected 0 <= n_pick <= {n}")
    if n_pick == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    c = rowwise_dot(x, y).astype(np.float64)
    if factorized or (n > max_dense and large == "factorized"):
        if batch is None:
            batch = 1 if n <= max_dense else max(1, math.ceil(n_pick / 256))
        return _greedy_factorized(x, y, c, n_pick, batch)
    if n <= max_dense:
        return _greedy_dense(x, y, c, n_pick)
    return _greedy_streamed(x, y, c, n_pick, block)


def _greedy_dense(x, y, c, n_pick):
    n = x.shape[0]
    s = x @ y.T  # (n, n) s_ab = cos(x_a, y_b)
    np.maximum(s, 0.0, out=s)
    gains = (s.sum(1, dtype=np.float64) + s.sum(0, dtype=np.float64)) / n + 2.0 * c
    picked = np.empty(n_pick, np.int64)
    got = np.empty(n_pick, np.float64)
    for t in range(n_pick):
        b = int(np.argmax(gains))
        picked[t], got[t] = b, gains[b]
        gains -= (s[:, b] + s[b, :]) / n
        gains[b] = -np.inf
    return picked, got


def _greedy_streamed(x, y, c, n_pick, block):
    n = x.shape[0]
    row, col = clipped_row_col_sums(x, y, block=block)
    gains = (row + col) / n + 2.0 * c
    picked = np.empty(n_pick, np.int64)
    got = np.empty(n_pick, np.float64)
    for t in range(n_pick):
        b = int(np.argmax(gains))
        picked[t], got[t] = b, gains[b]
        s_ab = np.maximum(x @ y[b], 0.0)  # s_{a b} for all a
        s_ba = np.maximum(y @ x[b], 0.0)  # s_{b a} for all a
        gains -= (s_ab + s_ba) / n
        gains[b] = -np.inf
    return picked, got


def _greedy_factorized(x, y, c, n_pick, batch):
    n = x.shape[0]
    sx = x.sum(0, dtype=np.float64).astype(np.float32)
    sy = y.sum(0, dtype=np.float64).astype(np.float32)
    base = (x @ sy + y @ sx).astype(np.float64) / n + 2.0 * c  # u_a + 2 c_a without the clip
    red = np.zeros(n, dtype=np.float64)
    avail = np.ones(n, dtype=bool)
    picked: list[np.ndarray] = []
    got: list[np.ndarray] = []
    done = 0
    while done < n_pick:
        g = np.where(avail, base - red, -np.inf)
        m = min(batch, n_pick - done)
        if m == 1:
            top = np.array([int(np.argmax(g))])
        else:
            top = np.argpartition(-g, m - 1)[:m]
            top = top[np.lexsort((top, -g[top]))]
        picked.append(top)
        got.append(g[top])
        avail[top] = False
        ys = y[top].sum(0, dtype=np.float64).astype(np.float32)
        xs = x[top].sum(0, dtype=np.float64).astype(np.float32)
        red += (x @ ys + y @ xs).astype(np.float64) / n
        done += m
    return np.concatenate(picked).astype(np.int64), np.concatenate(got)


def clipcov_select(
    img: np.ndarray,
    txt: np.ndarray,
    class_ids: np.ndarray,
    uids,
    n_keep: int,
    max_dense: int = DEFAULT_MAX_DENSE,
    large: str = "factorized",
    factorized: bool = False,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CLIPCov over a pool: same keep fraction per proxy class, greedy within each.

    Members of a class are visited in uid order, so ties in the greedy break by uid.

    Args:
        img, txt: (N, d) float32 aligned unit-norm embeddings.
        class_ids: (n,) int proxy class of each sample (the concept clusters by default).
        uids: (n,) str uids.
        n_keep: total to keep (split over classes with :func:`ssp_budgets`).
        max_dense, large, factorized: see :func:`clipcov_greedy`.
        rows: (n,) int64 rows of ``img``/``txt`` that ``class_ids``/``uids`` describe (a
            candidate subset), or None when they describe every row (n == N). Only one
            class's rows are gathered at a time, so no (n, d) copy is made.

    Returns:
        ``(kept, pos, gain)``: (n_keep,) int64 indices into ``class_ids`` (= pool rows when
        ``rows`` is None), their (n_keep,) int64 pick position within the class and
        (n_keep,) float64 marginal gain when picked.
    """
    class_ids = np.asarray(class_ids, dtype=np.int64)
    n = class_ids.shape[0]
    if rows is None and img.shape[0] != n:
        raise ValueError(f"clipcov_select: got {img.shape[0]} embedding rows for {n} samples; expected equal or rows=")
    if txt.shape[0] != img.shape[0] or len(uids) != n or (rows is not None and len(rows) != n):
        raise ValueError("clipcov_select: got arrays of different lengths; expected one row per sample")
    df = pl.DataFrame({"c": class_ids, "u": _uid_series(uids)}).with_row_index("i")
    order = df.sort(["c", "u"])["i"].to_numpy().astype(np.int64)
    c_sorted = class_ids[order]
    classes, starts, counts = np.unique(c_sorted, return_index=True, return_counts=True)
    budgets = ssp_budgets(counts, n_keep)
    kept, pos, gain = [], [], []
    for s, cnt, b in zip(starts.tolist(), counts.tolist(), budgets.tolist()):
        if b == 0:
            continue
        members = order[s : s + cnt]
        src = members if rows is None else rows[members]
        p, g = clipcov_greedy(img[src], txt[src], b, max_dense=max_dense, large=large, factorized=factorized)
        kept.append(members[p])
        pos.append(np.arange(b, dtype=np.int64))
        gain.append(g)
    if not kept:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    return np.concatenate(kept), np.concatenate(pos), np.concatenate(gain)


# --------------------------------------------------------------------------------------
# The same, with the work spread over an executor (in process or on Ray)
# --------------------------------------------------------------------------------------


def _clipcov_chunk(chunk: list[tuple[np.ndarray, int]], img, txt, max_dense, large, factorized):
    """Greedy CLIPCov (:func:`curation.select.clipcov.clipcov_greedy`) for a chunk of classes."""

    return [
        clipcov_greedy(img[members], txt[members], b, max_dense=max_dense, large=large, factorized=factorized)
        for members, b in chunk
    ]


def clipcov_select_distributed(
    executor: Executor,
    img: np.ndarray,
    txt: np.ndarray,
    class_ids: np.ndarray,
    uids,
    n_keep: int,
    max_dense: int | None = None,
    large: str = "factorized",
    factorized: bool = False,
    rows_per_task: int = 20_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`curation.select.clipcov.clipcov_select` with the proxy classes spread over ``executor``.

    Same per-class budgets (:func:`curation.select.budgets.ssp_budgets`), same member order (by
    class, then uid) and same greedy per class, so the output equals ``clipcov_select``'s.

    Args:
        executor: from :func:`make_executor`.
        img, txt: (n, d) float32 aligned unit-norm embeddings (shared once).
        class_ids: (n,) int proxy class; uids: (n,) str; n_keep: total to keep.
        max_dense, large, factorized: see :func:`curation.select.clipcov.clipcov_greedy`.
        rows_per_task: classes are packed into tasks of about this many rows.

    Returns:
        ``(kept, pos, gain)``: (n_keep,) int64 pool indices, int64 pick position within the
        class, float64 marginal gain when picked.
    """

    img = np.ascontiguousarray(img, dtype=np.float32)
    txt = np.ascontiguousarray(txt, dtype=np.float32)
    n = img.shape[0]
    class_ids = np.asarray(class_ids, dtype=np.int64)
    if class_ids.shape[0] != n or txt.shape[0] != n or len(uids) != n:
        raise ValueError("clipcov_select_distributed: got arrays of different lengths; expected one row per sample")
    u = uids if isinstance(uids, np.ndarray) and uids.dtype.kind in "SU" else np.asarray([str(v) for v in uids])
    order = np.lexsort((u, class_ids)).astype(np.int64)  # by class, then uid
    _, starts, counts = np.unique(class_ids[order], return_index=True, return_counts=True)
    budgets = ssp_budgets(counts, n_keep)
    items = [
        (order[s : s + c], int(b))
        for s, c, b in zip(starts.tolist(), counts.tolist(), budgets.tolist())
        if b > 0
    ]
    if not items:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    chunks = chunk_groups(items, [len(m) for m, _ in items], rows_per_task)
    results = executor.map(
        _clipcov_chunk,
        chunks,
        shared={"img": img, "txt": txt},
        max_dense=max_dense or DEFAULT_MAX_DENSE,
        large=large,
        factorized=factorized,
    )
    kept, pos, gain = [], [], []
    for chunk, res in zip(chunks, results):
        for (members, b), (p, g) in zip(chunk, res):
            kept.append(members[p])
            pos.append(np.arange(b, dtype=np.int64))
            gain.append(g)
    return np.concatenate(kept), np.concatenate(pos), np.concatenate(gain)
