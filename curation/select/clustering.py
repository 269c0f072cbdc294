"""Concept clusters: spherical k-means, assignment, incremental assignment, complexity.

ALGORITHMS.md sections 1 and 3.

* :func:`train_centroids` runs faiss k-means with ``spherical=True`` (centroids are
  re-normalized every iteration), a fixed ``seed``, ``niter`` (50) and
  ``max_points_per_centroid`` (256: faiss trains on a seeded uniform sample of at most
  ``256 * k`` points). It uses the GPU when faiss sees one, never requires it.
* :func:`assign` gives every sample its nearest centroid by inner product and
  ``cos_to_centroid``; :func:`assign_new` does it only for uids not assigned yet
  (incremental: no retraining).
* :func:`cluster_complexity`: ``d_intra``, ``d_inter`` over the ``l = min(20, k - 1)``
  nearest OTHER centroids (blocked top-l), ``C = d_intra * d_inter`` (clusters with fewer
  than two members get the mean complexity of the others), ``p = softmax(C / tau)``.

:func:`default_k` is the documented default for pools of any size. faiss is imported through
:func:`curation.select.faiss_loader.import_faiss`, so its bundled OpenBLAS runs the CPU's
AVX-512/AVX2 kernels on CPUs newer than it (it took an Emerald Rapids for an SSE3 ``Prescott``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from curation.select.faiss_loader import import_faiss
from curation.select.similarity import topk_inner_product

faiss = import_faiss()  # its bundled OpenBLAS on the CPU's AVX-512/AVX2 kernels (see faiss_loader)

log = logging.getLogger(__name__)

DEFAULT_NITER = 50
DEFAULT_MAX_POINTS_PER_CENTROID = 256
DEFAULT_TAU = 0.5
DEFAULT_NEIGHBORS = 20
ASSIGN_BLOCK = 65536


def default_k(n: int, max_k: int = 1000, min_cluster: int = 4) -> int:
    """Default number of concept clusters for a pool of ``n`` samples.

    ``k = round(sqrt(n / 4))`` clamped to ``[1, max_k]`` and to ``n // min_cluster`` so a
    cluster has a few members on average: 1k samples -> 16 clusters, 100k -> 158, 1M -> 500
    (the DBP paper's 500 for LAION), 4M and more -> 1000. Small pools get small k, so
    per-cluster pruning and SemDeDup still have neighbours to compare.
    """
    if n < 1:
        raise ValueError(f"n: got {n}; expected >= 1")
    k = int(round(math.sqrt(n / 4.0)))
    return max(1, min(k, max_k, max(1, n // min_cluster)))


def use_gpu() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # pragma: no cover - CPU-only builds without the symbol
        return False


def _normalize_rows(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float32, copy=True)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    a /= norms
    return a


def train_centroids(
    x: np.ndarray,
    k: int,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID,
    gpu: bool | None = None,
) -> np.ndarray:
    """Spherical k-means centroids.

    Args:
        x: (n, d) float32 unit-norm embeddings (not copied when already contiguous float32).
        k: number of clusters, ``1 <= k <= n``.
        niter: k-means iterations.
        seed: faiss seed (sampling of the training set and of the initial centroids).
        max_points_per_centroid: train on at most ``max_points_per_centroid * k`` points.
        gpu: force GPU on/off; ``None`` uses the GPU when faiss sees one.

    Returns:
        (k, d) float32 unit-norm centroids.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k: got {k}; expected 1 <= k <= n = {n}")
    if niter < 1:
        raise ValueError(f"niter: got {niter}; expected >= 1")
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid: got {max_points_per_centroid}; expected >= 1")
    gpu = use_gpu() if gpu is None else gpu
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        gpu=bool(gpu),
        verbose=False,
    )
    km.train(x)
    cent = _normalize_rows(km.centroids)
    log.info("k-means: n=%d d=%d k=%d niter=%d seed=%d gpu=%s", n, d, k, niter, seed, gpu)
    return cent


def _ip_index(centroids: np.ndarray, gpu: bool):
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if gpu:  # pragma: no cover - exercised only on GPU boxes
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def assign(x: np.ndarray, centroids: np.ndarray, block: int = ASSIGN_BLOCK, gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product.

    Args:
        x: (n, d) float32 unit-norm embeddings.
        centroids: (k, d) float32 unit-norm centroids.
        block: rows per faiss search call (bounds the temporary distance buffers).
        gpu: force GPU on/off; ``None`` uses the GPU when faiss sees one.

    Returns:
        ``(cluster_ids, cos_to_centroid)``: (n,) int32 and (n,) float32.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x: got shape {x.shape}; expected (n, {centroids.shape[1]})")
    gpu = use_gpu() if gpu is None else gpu
    index = _ip_index(centroids, gpu)
    n = x.shape[0]
    ids = np.empty(n, dtype=np.int32)
    cos = np.empty(n, dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        dist, lab = index.search(x[s:e], 1)
        ids[s:e] = lab[:, 0]
        cos[s:e] = dist[:, 0]
    return ids, cos


def assign_new(
    uids: np.ndarray,
    x: np.ndarray,
    centroids: np.ndarray,
    assigned_uids,
    gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Incremental assignment: only samples whose uid is not in ``assigned_uids``.

    The centroids are not retrained; existing assignments are left as they are.

    Args:
        uids: (n,) str uids of the rows of ``x``.
        x: (n, d) float32 unit-norm embeddings.
        centroids: (k, d) float32 existing centroids.
        assigned_uids: iterable of uids that already have an assignment.

    Returns:
        ``(new_idx, cluster_ids, cos)``: (m,) int64 row indices of the new samples and their
        (m,) int32 cluster ids and (m,) float32 cosines.
    """
    known = pl.Series(list(uids) if not isinstance(uids, pl.Series) else uids, dtype=pl.String).is_in(
        pl.Series(list(assigned_uids), dtype=pl.String)
    ).to_numpy()
    new_idx = np.flatnonzero(~known).astype(np.int64)
    if new_idx.size == 0:
        return new_idx, np.empty(0, np.int32), np.empty(0, np.float32)
    ids, cos = assign(x[new_idx], centroids, gpu=gpu)
    return new_idx, ids, cos


# --------------------------------------------------------------------------- large k: two-level

ASSIGN_METHODS = ("auto", "flat", "two-level")
#: Lloyd iterations over all centroids after the two-level k-means' hierarchical fit
TWO_LEVEL_REFINE = 5
FLAT_MAX_K = 2048
"""``method="auto"`` uses the exact flat search / k-means up to this k, the two-level one above."""


def _resolve(method: str, k: int) -> str:
    if method not in ASSIGN_METHODS:
        raise ValueError(f"method: got {method!r}; expected one of {ASSIGN_METHODS}")
    if method == "auto":
        return "flat" if k <= FLAT_MAX_K else "two-level"
    return method


def coarse_lists(k: int) -> int:
    """Coarse cells of the two-level search over ``k`` centroids: ``round(sqrt(k))``."""
    return max(1, int(round(math.sqrt(k))))


class TwoLevelAssigner:
    """Nearest centroid through an IVF coarse quantizer over the centroids (sub-linear in k),
    built once for a set of centroids and applied to any number of row blocks.

    The ``k`` centroids are grouped into ``nlist = round(sqrt(k))`` cells by faiss's IVF
    training (spherical k-means over the centroids, seed 0); each query scans the ``nprobe``
    nearest cells (default ``max(8, nlist // 8)``), so the cost per row is ``O((nlist +
    nprobe * k / nlist) d)`` instead of ``O(k d)``; ``nprobe = nlist`` is exact.

    On CPU the scan is matrix products, not faiss's per-query list scan: one (rows x nlist)
    product picks each row's cells, then per cell one (rows probing it x cell members)
    product. At 10M x 512 rows and k = 10,000 faiss's ``IndexIVFFlat.search`` ran at ~20
    GFLOP/s on this machine's 2 cores, the products at BLAS speed (docs/benchmarks.md). On a
    GPU it is faiss's ``IndexIVFFlat`` on the GPU. Same cells, same probes, same result up to
    ties between equal inner products.
    """

    def __init__(self, centroids: np.ndarray, nprobe: int | None = None, gpu: bool | None = None):
        cent = np.ascontiguousarray(centroids, dtype=np.float32)
        k, d = cent.shape
        self.k, self.d = k, d
        self.nlist = coarse_lists(k)
        self.nprobe = min(self.nlist, nprobe or max(8, self.nlist // 8))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.cp.niter = 20
        index.cp.spherical = True
        index.train(cent)
        self.cent = cent
        self.coarse = quant.reconstruct_n(0, self.nlist)
        _, cell = quant.search(cent, 1)  # the cell each centroid is stored in (what IVF's add does)
        self.cell_of = cell = cell[:, 0].astype(np.int64)
        self.gpu = use_gpu() if gpu is None else gpu
        if self.gpu:  # pragma: no cover - GPU boxes only
            index.add(cent)
            index.nprobe = self.nprobe
            self.index = faiss.index_cpu_to_all_gpus(index)
            return
        order = np.argsort(cell, kind="stable")
        bounds = np.searchsorted(cell[order], np.arange(self.nlist + 1))
        self.members = [order[a:b].astype(np.int32) for a, b in zip(bounds[:-1], bounds[1:])]
        self.cells = [np.ascontiguousarray(cent[m]) for m in self.members]

    def __call__(self, x: np.ndarray, block: int = ASSIGN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """``(cluster_ids (n,) int32, cos (n,) float32)`` of the rows of ``x`` (n, d)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x: got shape {x.shape}; expected (n, {self.d})")
        n = x.shape[0]
        ids = np.empty(n, dtype=np.int32)
        cos = np.empty(n, dtype=np.float32)
        for s in range(0, n, block):
            e = min(n, s + block)
            if self.gpu:  # pragma: no cover - GPU boxes only
                dist, lab = self.index.search(x[s:e], 1)
                ids[s:e], cos[s:e] = lab[:, 0], dist[:, 0]
            else:
                ids[s:e], cos[s:e] = self._scan(x[s:e])
        if n and ids.min() < 0:  # a query whose probed cells were empty: exact fallback
            bad = np.flatnonzero(ids < 0)
            ids[bad], cos[bad] = assign(x[bad], self.cent, gpu=False)
        return ids, cos

    def recall_curve(self, x: np.ndarray) -> np.ndarray:
        """``(nlist,)`` float: entry ``p - 1`` is the fraction of the rows of ``x`` whose exact
        nearest centroid this search finds with ``nprobe = p`` (up to ties of equal inner
        products). The search finds it exactly when that centroid's cell is among the ``p``
        cells nearest the row, so one exact search and one coarse product give every nprobe's
        recall at once: the curve is the distribution of the true cell's rank."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d or x.shape[0] == 0:
            raise ValueError(f"x: got shape {x.shape}; expected (n >= 1, {self.d})")
        exact = exact_nearest(x, self.cent)[0]
        cs = x @ self.coarse.T
        true_cell = cs[np.arange(x.shape[0]), self.cell_of[exact]]
        rank = (cs > true_cell[:, None]).sum(axis=1)  # cells strictly nearer than the true one
        return np.cumsum(np.bincount(rank, minlength=self.nlist)[: self.nlist]) / x.shape[0]

    def calibrate(self, x: np.ndarray, target_recall: float) -> np.ndarray:
        """Set ``nprobe`` to the fewest cells whose recall on the rows of ``x`` (a sample of
        the pool) reaches ``target_recall``; returns the :meth:`recall_curve`."""
        if not 0.0 < float(target_recall) <= 1.0:
            raise ValueError(f"target_recall: got {target_recall}; expected 0 < target_recall <= 1")
        curve = self.recall_curve(x)
        self.nprobe = int(np.searchsorted(curve, float(target_recall) - 1e-12) + 1)
        self.nprobe = min(self.nlist, self.nprobe)
        if self.gpu:  # pragma: no cover - GPU boxes only (a GPU IVF index or its replicas)
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.nprobe)
        return curve

    def _scan(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = xb.shape[0]
        cs = xb @ self.coarse.T  # (b, nlist)
        if self.nprobe < self.nlist:
            probe = np.argpartition(-cs, self.nprobe - 1, axis=1)[:, : self.nprobe]
        else:
            probe = np.broadcast_to(np.arange(self.nlist), (b, self.nlist))
        pl_ = probe.ravel()
        pq = np.repeat(np.arange(b, dtype=np.int64), probe.shape[1])
        order = np.argsort(pl_, kind="stable")
        bounds = np.searchsorted(pl_[order], np.arange(self.nlist + 1))
        best = np.full(b, -np.inf, dtype=np.float32)
        arg = np.full(b, -1, dtype=np.int32)
        for c in range(self.nlist):
            mem = self.members[c]
            if bounds[c] == bounds[c + 1] or mem.size == 0:
                continue
            q = pq[order[bounds[c] : bounds[c + 1]]]  # each query probes a cell once: unique
            sim = xb[q] @ self.cells[c].T  # (queries probing c, members of c)
            j = sim.argmax(axis=1)
            v = sim[np.arange(q.size), j]
            up = v > best[q]
            best[q[up]] = v[up]
            arg[q[up]] = mem[j[up]]
        return arg, best


def exact_nearest(x: np.ndarray, centroids: np.ndarray, block: int = ASSIGN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The exact nearest centroid of a few rows by one product per block (no index built):
    ``(ids (n,) int64, cos (n,) float32)``. For audits of an approximate assignment."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = np.empty(x.shape[0], np.int64)
    cos = np.empty(x.shape[0], np.float32)
    for s in range(0, x.shape[0], block):
        g = x[s : s + block] @ centroids.T
        ids[s : s + block] = g.argmax(axis=1)
        cos[s : s + block] = g[np.arange(g.shape[0]), ids[s : s + block]]
    return ids, cos


def assign_two_level(
    x: np.ndarray, centroids: np.ndarray, nprobe: int | None = None, block: int = ASSIGN_BLOCK, gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:class:`TwoLevelAssigner` built for ``centroids`` and applied to ``x`` (one call; a
    caller assigning many blocks builds the assigner once, see :func:`assigner`)."""
    return TwoLevelAssigner(centroids, nprobe=nprobe, gpu=gpu)(x, block=block)


def assigner(centroids: np.ndarray, method: str = "auto", gpu: bool | None = None, nprobe: int | None = None):
    """A callable ``x -> (cluster_ids, cos)`` for ``centroids``: :func:`assign` (flat) or a
    :class:`TwoLevelAssigner` built ONCE (``auto`` picks by k), for callers that assign many
    partitions with the same centroids (its cells are trained once, not per partition).
    ``nprobe``: cells the two-level search scans (None: its default; ignored when flat)."""
    if nprobe is not None and int(nprobe) < 1:
        raise ValueError(f"nprobe: got {nprobe}; expected >= 1 or None")
    if _resolve(method, centroids.shape[0]) == "flat":
        return lambda x: assign(x, centroids, gpu=gpu)
    return TwoLevelAssigner(centroids, nprobe=nprobe, gpu=gpu)


def assign_any(x: np.ndarray, centroids: np.ndarray, method: str = "auto", gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign` (flat, exact) or :func:`assign_two_level` (large k); ``auto`` picks by k."""
    if _resolve(method, centroids.shape[0]) == "flat":
        return assign(x, centroids, gpu=gpu)
    return assign_two_level(x, centroids, gpu=gpu)


def train_centroids_two_level(
    x: np.ndarray,
    k: int,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID,
    gpu: bool | None = None,
    refine: int = TWO_LEVEL_REFINE,
) -> np.ndarray:
    """Hierarchical spherical k-means: cost per iteration ``O(n sqrt(k) d)``, not ``O(n k d)``.

    A coarse k-means with ``k0 = round(sqrt(k))`` cells, then inside each cell a k-means with
    ``k_i`` centroids, ``k_i`` proportional to the cell's size (largest remainder, ``1 <= k_i
    <= n_i``, ``sum k_i = k``); then ``refine`` Lloyd iterations over ALL the centroids (each
    row to its nearest centroid by :class:`TwoLevelAssigner`, each centroid the normalized mean
    of its rows; an empty one stays). The hierarchy alone fixes every coarse cell's share of
    centroids and never lets a centroid cross a cell border: concepts cut by a border end up
    split or merged (on planted concepts at k = 1,000 the mean cos of a concept's center to its
    best centroid was 0.818 against 0.960 for flat k-means; 5 refinement iterations: 0.970).
    Returns (k, d) float32 unit-norm centroids.
    """
    from curation.select.budgets import largest_remainder

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: got {k}; expected 1 <= k <= n = {n}")
    k0 = min(coarse_lists(k), k)
    coarse = train_centroids(x, k0, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid, gpu=gpu)
    cell, _ = assign(x, coarse, gpu=gpu)
    sizes = np.bincount(cell, minlength=k0)
    nz = sizes > 0
    ub = sizes.copy()
    lb = nz.astype(np.int64)
    if int(lb.sum()) > k:
        raise ValueError(f"k: got {k}; expected >= the {int(lb.sum())} non-empty coarse cells")
    ks = largest_remainder(k * sizes / max(1, sizes.sum()), k, lb, ub)
    out = []
    for c in range(k0):
        if ks[c] == 0:
            continue
        xi = x[cell == c]
        out.append(train_centroids(xi, int(ks[c]), niter=niter, seed=seed + 1 + c,
                                   max_points_per_centroid=max_points_per_centroid, gpu=gpu) if ks[c] < len(xi) else _normalize_rows(xi))
    cent = np.concatenate(out)
    for _ in range(max(0, int(refine))):
        cent = _lloyd_step(x, cent, TwoLevelAssigner(cent, gpu=gpu)(x)[0])
    log.info("two-level k-means: n=%d k=%d (coarse %d, %d refinement iterations)", n, k, k0, refine)
    return cent


def _lloyd_step(x: np.ndarray, cent: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Spherical k-means update: each centroid the normalized mean (sum) of its rows ``ids``;
    a centroid without rows keeps its place."""
    from scipy.sparse import csr_matrix

    k, n = cent.shape[0], x.shape[0]
    # (k x n) membership times x: the per-centroid sums without a sorted copy of the sample
    member = csr_matrix((np.ones(n, np.float32), (np.asarray(ids, np.int64), np.arange(n))), shape=(k, n))
    sums = np.asarray(member @ x)
    nz = np.bincount(ids, minlength=k) > 0
    new = cent.copy()
    new[nz] = _normalize_rows(sums[nz])
    return new


def train_centroids_any(x: np.ndarray, k: int, method: str = "auto", **kwargs) -> np.ndarray:
    """:func:`train_centroids` (flat) or :func:`train_centroids_two_level`; ``auto`` picks by k."""
    if _resolve(method, k) == "flat":
        return train_centroids(x, k, **kwargs)
    return train_centroids_two_level(x, k, **kwargs)


@dataclass(frozen=True)
class Complexity:
    """Per-cluster complexity (ALGORITHMS.md section 3); arrays of shape (k,).

    Attributes:
        size: int64 members per cluster.
        d_intra: float64 mean ``1 - cos(x_i, mu_j)`` over members (0 for an empty cluster).
        d_inter: float64 mean ``1 - cos(mu_j, mu_m)`` over the ``l`` nearest other centroids.
        complexity: float64 ``d_intra * d_inter``; clusters with < 2 members get the mean of
            the others.
        weight: float64 ``softmax(complexity / tau)``.
        n_neighbors: the ``l`` used.
        tau: the softmax temperature used.
    """

    size: np.ndarray
    d_intra: np.ndarray
    d_inter: np.ndarray
    complexity: np.ndarray
    weight: np.ndarray
    n_neighbors: int
    tau: float


def softmax(z: np.ndarray, tau: float) -> np.ndarray:
    """``softmax(z / tau)`` in float64, numerically stable."""
    if tau <= 0:
        raise ValueError(f"tau: got {tau}; expected > 0")
    z = np.asarray(z, dtype=np.float64) / tau
    if z.size == 0:
        return z
    e = np.exp(z - z.max())
    return e / e.sum()


def cluster_complexity(
    cluster_ids: np.ndarray,
    cos_to_centroid: np.ndarray,
    centroids: np.ndarray,
    n_neighbors: int = DEFAULT_NEIGHBORS,
    tau: float = DEFAULT_TAU,
    block: int = 4096,
    d_inter: np.ndarray | None = None,
) -> Complexity:
    """d_intra, d_inter, complexity and softmax weight of every cluster.

    ``d_intra`` only needs the stored cosines: ``mean(1 - cos) = 1 - mean(cos)``.
    ``d_inter`` uses ``l = min(n_neighbors, k - 1)`` nearest OTHER centroids, found with a
    blocked top-l over ``block`` centroid rows at a time (never a ``k x k`` matrix for
    large ``k``). With ``k == 1`` there is no other centroid: ``d_inter = 0``,
    complexity 0 and weight 1.

    Args:
        cluster_ids: (n,) int cluster of each sample, in ``[0, k)``.
        cos_to_centroid: (n,) float cosine of each sample to its centroid.
        centroids: (k, d) float32 unit-norm centroids.
        n_neighbors: the 20 of ``l = min(20, k - 1)``.
        tau: softmax temperature (default 0.5, the reference's).
        block: centroid rows per block in the top-l search.
        d_inter: (k,) a stored ``d_inter`` (it depends only on the centroids and ``l``) to
            reuse instead of the top-l search.

    Returns:
        A :class:`Complexity`.
    """
    k = centroids.shape[0]
    cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
    if cluster_ids.size and (cluster_ids.min() < 0 or cluster_ids.max() >= k):
        raise ValueError(f"cluster_ids: got ids outside [0, {k}); expected ids of the {k} centroids")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors: got {n_neighbors}; expected >= 1")
    size = np.bincount(cluster_ids, minlength=k).astype(np.int64)
    cos_sum = np.bincount(cluster_ids, weights=np.asarray(cos_to_centroid, dtype=np.float64), minlength=k)
    d_intra = np.zeros(k, dtype=np.float64)
    nz = size > 0
    d_intra[nz] = 1.0 - cos_sum[nz] / size[nz]
    l = min(n_neighbors, k - 1)
    if d_inter is not None:
        d_inter = np.asarray(d_inter, dtype=np.float64)
        if d_inter.shape != (k,):
            raise ValueError(f"d_inter: got shape {d_inter.shape}; expected ({k},)")
    elif l >= 1:
        sims, _ = topk_inner_product(centroids, centroids, l, exclude_self=True, block=block)
        d_inter = (1.0 - sims.astype(np.float64)).mean(axis=1)
    else:
        d_inter = np.zeros(k, dtype=np.float64)
    comp = d_intra * d_inter
    small = size < 2
    if small.any():
        comp[small] = comp[~small].mean() if (~small).any() else 0.0
    return Complexity(
        size=size,
        d_intra=d_intra,
        d_inter=d_inter,
        complexity=comp,
        weight=softmax(comp, tau),
        n_neighbors=l,
        tau=float(tau),
    )
