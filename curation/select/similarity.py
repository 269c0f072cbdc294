"""Blocked similarity kernels shared by clustering, SemDeDup and CLIPCov.

Every kernel works on L2-normalized ``float32`` rows (cosine = inner product) and is
*blocked*: it never materializes an ``n x n`` (or ``n x k`` for large ``k``) matrix, only
``block x n`` tiles, so peak extra memory is ``O(block * n)`` floats. The dense products
run through BLAS (numpy ``matmul``) which uses every core it is given.

Functions:
    max_sim_to_earlier   M_j = max_{i<j} x_i . x_j for an ordered set (SemDeDup).
    max_sim_to_earlier_blocked  the same with keys blocked too (memmaps, huge clusters).
    blocked_max_sim      for each query, the max inner product with a key set.
    topk_inner_product   the ``l`` largest inner products per query, optionally excluding
                         the query's own index (nearest OTHER centroids).
    clipped_row_col_sums row and column sums of ``max(0, A @ B.T)`` (CLIPCov coverage).
    rowwise_dot          ``sum(a * b, axis=1)`` without an ``(n, d)`` temporary.
    single_thread_blas   a context that runs BLAS on one thread (many small products).
"""

from __future__ import annotations

import contextlib

import numpy as np

from curation.select.native_blas import ssyrk_upper

DEFAULT_BLOCK = 2048
#: rows per slab of the masked row max in :func:`max_sim_to_earlier` (its mask is this square)
_MAX_ROWS = 256


def single_thread_blas():
    """A context in which numpy's BLAS runs on ONE thread.

    For many small products (a few rows times one cluster) the BLAS threads cost more in
    synchronization than they compute; on a machine whose cores are shared with other work
    a thread that spins while the other is descheduled makes a 10 MFLOP product take 1-30 ms
    instead of ~0.2 ms (measured in docs/benchmarks.md). Parallelism then comes from the
    executor (one bucket per task). Uses ``threadpoolctl`` (installed with scikit-learn, a
    dependency of clip-benchmark); without it this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - the pinned environment has it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _as_f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_block(block: int) -> int:
    if int(block) < 1:
        raise ValueError(f"block: got {block}; expected >= 1")
    return int(block)


_MASKS: dict[int, np.ndarray] = {}


def _upper_mask(b: int) -> np.ndarray:
    """(b, b) bool upper triangle including the diagonal (cached; slices of it are too)."""
    for size, m in _MASKS.items():
        if size >= b:
            return m
    m = np.triu(np.ones((b, b), dtype=bool))
    _MASKS.clear()
    _MASKS[b] = m
    return m


def max_sim_to_earlier(x: np.ndarray, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """For rows in their given order, the max cosine to any EARLIER row.

    ``M_j = max_{i < j} x_i . x_j`` and ``M_0 = -1`` (nothing earlier). Rows are processed
    in blocks of ``block``: block ``[s, e)`` is multiplied only against rows ``[0, e)``
    (the lower triangle), so the work is ~n^2 d / 2 and peak extra memory ``block * n``.
    The first block (a whole cluster, normally) is one BLAS ``ssyrk`` called on numpy's own
    OpenBLAS without numpy's copy of the triangle (:mod:`curation.select.native_blas`; the
    same values, ~0.8x the time), or ``x @ x.T`` where that routine is not available.

    Callers run it on ONE BLAS thread (:func:`single_thread_blas`): OpenBLAS's Haswell kernels
    (an AMD EPYC here) split ``ssyrk`` over threads with other rounding, so a 300 x 512 Gram
    on two threads differed from one thread's in the last bit; on one thread the values do
    not depend on the machine's core count (the in-memory loop, the layout's bucket tasks
    and Ray tasks agree bit for bit).

    Args:
        x: (n, d) float32, unit-norm rows, already in the SemDeDup order.
        block: rows per block.

    Returns:
        (n,) float32 max similarity to earlier rows (-1 for the first row).
    """
    block = _check_block(block)
    x = _as_f32(x)
    n = x.shape[0]
    out = np.full(n, -1.0, dtype=np.float32)
    if n <= 1:
        return out
    head = x[:block]
    gram = ssyrk_upper(head)  # the first block's x @ x.T, upper triangle only (no copy into the lower one)
    if gram is None:
        gram = head @ head.T  # numpy's syrk: the same upper triangle, copied into the lower one
    first = gram.shape[0]
    _max_above_diagonal(gram, out[:first])
    del gram
    upper = _upper_mask(min(block, n, _MAX_ROWS))
    for s in range(first, n, block):
        e = min(n, s + block)
        g = x[s:e] @ x[:e].T  # (b, e): the block against every row up to its own last one
        # Row j's max over the columns i < j only: in row slabs, each slab reads the columns
        # up to its last row (the lower triangle, not the whole square) and masks its own
        # diagonal block (column i >= row j).
        for t in range(0, e - s, _MAX_ROWS):
            u = min(e - s, t + _MAX_ROWS)
            slab = g[t:u, : s + u]
            np.copyto(slab[:, s + t :], -np.inf, where=upper[: u - t, : u - t])
            out[s + t : s + u] = slab.max(axis=1)
    out[0] = -1.0
    return out


def _max_above_diagonal(gram: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Column ``j``'s max over the rows ``i < j`` of ``gram`` (only its strict upper triangle is
    read), into ``out`` (``out[0]`` stays as given). In row slabs: the columns right of a slab
    are all later than its rows (no mask); only the slab's own square is masked, in place."""
    n = gram.shape[0]
    best = np.full(n, -np.inf, dtype=np.float32)
    lower = _upper_mask(min(n, _MAX_ROWS)).T  # (b, b) rows >= columns: not earlier
    for s in range(0, n, _MAX_ROWS):
        e = min(n, s + _MAX_ROWS)
        square = gram[s:e, s:e]
        np.copyto(square, -np.inf, where=lower[: e - s, : e - s])
        np.maximum(best[s:e], square.max(axis=0), out=best[s:e])
        if e < n:
            np.maximum(best[e:], gram[s:e, e:].max(axis=0), out=best[e:])
    out[1:] = best[1:]
    return out


def max_sim_to_earlier_blocked(x: np.ndarray, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """:func:`max_sim_to_earlier` with the keys blocked too: for a cluster too large for memory.

    ``x`` may be a ``np.memmap``; only one ``block`` of query rows and one of key rows are
    loaded at a time (peak extra memory ``3 * block * max(block, d)`` floats), so a cluster
    of any size is processed, never rejected. Same values as :func:`max_sim_to_earlier`.

    Args:
        x: (n, d) float32 unit-norm rows in SemDeDup order (array or memmap).
        block: rows per query and key block.

    Returns:
        (n,) float32 max similarity to earlier rows (-1 for the first row).
    """
    block = _check_block(block)
    n = x.shape[0]
    out = np.full(n, -1.0, dtype=np.float32)
    if n <= 1:
        return out
    for s in range(0, n, block):
        e = min(n, s + block)
        q = np.ascontiguousarray(x[s:e], dtype=np.float32)
        m = np.full(e - s, -np.inf, dtype=np.float32)
        for t in range(0, e, block):
            u = min(e, t + block)
            kb = q if t == s else np.ascontiguousarray(x[t:u], dtype=np.float32)
            g = q @ kb.T  # (e - s, u - t)
            if u > s:  # the diagonal block: only keys strictly before the query
                qi = np.arange(s, e)[:, None]
                ki = np.arange(t, u)[None, :]
                g[ki >= qi] = -np.inf
            np.maximum(m, g.max(axis=1), out=m)
        if s == 0:
            m[0] = -1.0
        out[s:e] = m
    return out


def blocked_max_sim(queries: np.ndarray, keys: np.ndarray, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Max inner product of each query with any key.

    Args:
        queries: (m, d) float32.
        keys: (n, d) float32.
        block: query rows per block (peak extra memory ``block * n`` floats).

    Returns:
        (m,) float32; -inf where ``keys`` is empty.
    """
    block = _check_block(block)
    q, k = _as_f32(queries), _as_f32(keys)
    out = np.full(q.shape[0], -np.inf, dtype=np.float32)
    if k.shape[0] == 0:
        return out
    for s in range(0, q.shape[0], block):
        e = min(q.shape[0], s + block)
        out[s:e] = (q[s:e] @ k.T).max(axis=1)
    return out


def topk_inner_product(
    queries: np.ndarray,
    keys: np.ndarray,
    l: int,
    exclude_self: bool = False,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``l`` largest inner products of each query with the keys.

    Args:
        queries: (m, d) float32.
        keys: (n, d) float32.
        l: neighbours per query (``<= n``, or ``<= n - 1`` with ``exclude_self``).
        exclude_self: query ``i`` is key ``i`` (``queries is keys``); never return it.
        block: query rows per block (peak extra memory ``block * n`` floats).

    Returns:
        ``(sims, idx)``: (m, l) float32 sorted descending, (m, l) int64 key indices.
    """
    block = _check_block(block)
    q, k = _as_f32(queries), _as_f32(keys)
    m, n = q.shape[0], k.shape[0]
    avail = n - 1 if exclude_self else n
    if l < 0 or l > avail:
        raise ValueError(f"l: got {l}; expected 0 <= l <= {avail}")
    sims = np.empty((m, l), dtype=np.float32)
    idx = np.empty((m, l), dtype=np.int64)
    if l == 0:
        return sims, idx
    for s in range(0, m, block):
        e = min(m, s + block)
        g = q[s:e] @ k.T  # (b, n)
        if exclude_self:
            r = np.arange(e - s)
            g[r, s + r] = -np.inf
        part = np.argpartition(-g, l - 1, axis=1)[:, :l]
        vals = np.take_along_axis(g, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        sims[s:e] = np.take_along_axis(vals, order, axis=1)
        idx[s:e] = np.take_along_axis(part, order, axis=1)
    return sims, idx


def clipped_row_col_sums(a: np.ndarray, b: np.ndarray, block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums of ``S = max(0, a @ b.T)`` without forming ``S``.

    Args:
        a: (n, d) float32 (e.g. image embeddings of a class).
        b: (m, d) float32 (e.g. caption embeddings of the same class).
        block: rows of ``a`` per block (peak extra memory ``block * m`` floats).

    Returns:
        ``(row, col)``: (n,) float64 ``sum_j S_ij`` and (m,) float64 ``sum_i S_ij``.
    """
    block = _check_block(block)
    a, b = _as_f32(a), _as_f32(b)
    row = np.zeros(a.shape[0], dtype=np.float64)
    col = np.zeros(b.shape[0], dtype=np.float64)
    for s in range(0, a.shape[0], block):
        e = min(a.shape[0], s + block)
        g = a[s:e] @ b.T
        np.maximum(g, 0.0, out=g)
        row[s:e] = g.sum(axis=1, dtype=np.float64)
        col += g.sum(axis=0, dtype=np.float64)
    return row, col


def rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a * b).sum(1)`` for (n, d) float32 inputs, as (n,) float32, with no (n, d) temporary."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: got {a.shape} and {b.shape}; expected equal shapes")
    return np.einsum("ij,ij->i", _as_f32(a), _as_f32(b)).astype(np.float32, copy=False)
