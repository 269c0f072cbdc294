"""The pool laid out by concept cluster: out-of-core clustering, SemDeDup and incremental updates.

The pool-wide stages never hold the ``(N, d)`` matrix. Instead:

1. :func:`fit_centroids` trains spherical k-means on a bounded, seeded uniform sample of at
   most ``max_points_per_centroid * k`` rows, read partition by partition
   (:func:`training_sample`).
2. :func:`build_layout` streams the ``embeddings`` table ONE shard partition at a time,
   assigns each row to its nearest centroid (:func:`curation.select.clustering.assign`, or
   the two-level search for large k) and writes, once, two tables: ``assignments`` (uid,
   shard, cluster_id, cos_to_centroid) and ``pool_by_cluster``, the vectors partitioned by
   cluster *bucket* (``bucket = cluster_id // clusters_per_bucket``, a zero-padded string),
   with 16-byte binary uids and the vector as raw ``float32`` or ``float16`` bytes
   (column ``emb_float32`` / ``emb_float16``). Rows are buffered up to ``flush_rows`` before
   an append, so peak memory is centroids + one partition + the buffer.
3. :func:`dedup_scores_by_bucket` computes SemDeDup ``M`` one bucket at a time; each task
   reads its own bucket from the lake (:func:`bucket_scores`, run through an
   :class:`~curation.engine.executor.Executor`: in process or on Ray, no driver-side matrix).
   A bucket whose vectors exceed ``memory_budget_bytes`` is processed cluster by cluster,
   and a cluster above the budget is spilled in SemDeDup order to a temporary memmap and
   scored with the doubly blocked kernel
   :func:`curation.select.similarity.max_sim_to_earlier_blocked`: processed in blocks, never
   rejected.
4. Incremental re-curation: :func:`update_layout` assigns only shards that are new or whose
   content changed (their Delta files' fingerprint differs, so a changed shard re-enters as
   new content: its old rows are deleted first), and :func:`dedup_scores_by_bucket`
   recomputes only the clusters that gained or lost members: clusters that only GAINED
   members get the exact update ``M'_j = max(M_j, max_{new i before j} cos(x_i, x_j))``
   (one ``(new x members)`` product), clusters that lost members are recomputed. When the
   shards were only ADDED since the stored scores (``dedup_scores_shards``, the layout's
   fingerprints at the last write, says so), each touched bucket is read once and its task
   returns the new members' M and the old members' gain (:func:`_bucket_gains`: every cluster
   of the bucket in one pass), combined with the stored M by a uint64 uid key (no N-scale
   string join; in process, a task ending after the driver has read the stored M returns only
   the gains that beat it); a uid of a shard whose content changed since
   re-enters as new content (removed from its old cluster, added to its new one: both
   recomputed). When changed or removed shards touch clusters holding most of the pool
   (``LayoutConfig.full_pass_fraction``, 80%: a replaced shard of a web crawl touches nearly
   every cluster), every bucket is recomputed instead of joining the pool's uids first.
   Budgets and selections are then recomputed from the stored scores. The result is
   identical to a full recompute (tests/test_layout_pool.py).
5. :func:`compact_layout` (on request) rewrites buckets that hold many files (one per flush,
   one per update) as one file in cluster order, so reading a few clusters reads their row
   groups and little else.

Peak memory of every step is bounded by the largest bucket (or the budget) + centroids +
one partition, never by N.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pa_fs

from curation.embed.pool_reader import iter_pool_partitions, partition_fingerprints
from curation.engine.executor import Executor, InProcessExecutor
from curation.engine.sorting import lex_order
from curation.ingest.ids import (
    UID_BYTES,
    _fixed_binary,
    binary_column_to_bytes,
    binary_uid_column,
    bytes_to_hex,
    uid_arrow,
    uids_to_bytes,
)
from curation.select.clustering import (
    DEFAULT_MAX_POINTS_PER_CENTROID,
    DEFAULT_NITER,
    TwoLevelAssigner,
    assigner,
    exact_nearest,
    train_centroids_any,
)
from curation.select import native_blas
from curation.select.similarity import (
    DEFAULT_BLOCK,
    max_sim_to_earlier,
    max_sim_to_earlier_blocked,
    single_thread_blas,
)
from curation.storage.lake import TABLES, UID_PLAIN_TABLES, PACKED_COLUMNS, Lake, plain_writer_properties, release_memory

log = logging.getLogger(__name__)

LAYOUT_TABLE = "pool_by_cluster"
SHARDS_TABLE = "pool_by_cluster_shards"
DTYPES = ("float32", "float16")
DEFAULT_CLUSTERS_PER_BUCKET = 32
DEFAULT_FLUSH_ROWS = 131_072
DEFAULT_MEMORY_BUDGET = 1 << 30
# the general update's uid join costs ~20% of a full pass at 1M (docs/benchmarks.md): a full
# pass is cheaper once the touched clusters hold ~80% of the rows
DEFAULT_FULL_PASS_FRACTION = 0.8
#: rows per Parquet row group of ``pool_by_cluster`` (2 MiB of float32 x 512 vectors): the
#: granularity at which a read of some clusters skips the rest of a bucket. 1,024 rows read a
#: bucket ~30% faster than 256 (fewer, larger column chunks to decode: 245 vs 343 ms for 8
#: buckets of the 1M pool) and, at ~1,000 members per cluster, still skip most of a bucket
LAYOUT_ROW_GROUP_ROWS = 1024
#: the add-only update multiplies a cluster's run of vectors by its few new members in pieces
#: of at most this many multiply-adds (rows x new members x d) where numpy's OpenBLAS has a
#: direct small-matrix sgemm (:func:`curation.select.native_blas.direct_sgemm`): a product that
#: small skips packing the run. Per row, one thread, unaligned runs of 512-d vectors, on a
#: SkylakeX-kernel box: 10 new members 493 ns in 1,000-row products, 326 ns in 100-row
#: pieces, 448 ns in 128-row ones; 16 new members 439 / 341 ns (64-row pieces). From ~20 new
#: members on, whole runs cost the same or less (400: 2,922 ns whole, 3,830 in 100-row pieces),
#: so pieces are cut only when they hold at least ``MATMUL_MIN_PIECE_ROWS`` rows. Other cores
#: pack every product, small or not: on Haswell kernels (an AMD EPYC, AVX2) 10 new members
#: took 412 ns a row in 102-row pieces and 390 ns in 1,024-row ones, and the pieces' extra
#: calls held the GIL the two bucket threads share (scoring a 10k shard that touched every
#: cluster of a 1M pool: 0.877 s in pieces, 0.765 s in whole runs, medians of 5), so there a
#: run is one product
MATMUL_PIECE_MNK = 1 << 19
MATMUL_MIN_PIECE_ROWS = 64
#: a cluster lying in runs shorter than this on average (a layout of many small flushes) is
#: gathered and multiplied whole: many tiny products cost more than the copy
MATMUL_MIN_RUN = 32
#: rows of every streamed shard whose two-level assignment is checked against the exact nearest
#: centroid (seeded by the shard name): the pool-wide recall estimate of :class:`LayoutUpdate`
AUDIT_ROWS_PER_SHARD = 32
#: rows that calibrate nprobe for ``LayoutConfig.target_recall``, drawn from up to
#: :data:`CALIBRATION_SHARDS` shards spread evenly over the streamed ones (a first shard alone
#: could be topical and set nprobe for its few concepts only)
CALIBRATION_ROWS = 4096
CALIBRATION_SHARDS = 8


@dataclass(frozen=True)
class LayoutConfig:
    """How the pool is laid out by cluster.

    Attributes:
        clusters_per_bucket: clusters per ``pool_by_cluster`` partition (~1,000 members each
            at the real regime, so 32 clusters x 1,000 x 2 KiB = 64 MiB per bucket).
        dtype: vector storage type, one of ``DTYPES`` (``float16`` halves bytes read and
            written; scores are computed in float32 from the stored values).
        flush_rows: rows buffered before one append to the lake.
        memory_budget_bytes: largest bucket (float32 vectors) read at once; larger buckets
            are processed cluster by cluster, larger clusters in blocks from a memmap.
        block: rows per similarity block inside a cluster.
        with_text: also store the caption vector (column ``text_<dtype>``), for an ALIGNED
            (CLIP) embeddings encoder, so CLIPCov and CLIP score read one bucket at a time.
        nprobe: coarse cells the two-level assignment scans per row (None: ``max(8, nlist //
            8)``, 12 of 100 cells at k = 10,000; ``nlist`` is exact). Recall against the exact
            nearest centroid depends on the data: 76% at 12, 96% at 50 on the synthetic 10M
            pool (docs/benchmarks.md), where 50 costs as much as the flat search.
        target_recall: instead of a fixed ``nprobe``, the fewest cells whose recall reaches
            this fraction on :data:`CALIBRATION_ROWS` rows drawn from up to
            :data:`CALIBRATION_SHARDS` shards spread over the streamed ones (one exact search of
            those rows). Either way the pool-wide recall is estimated on
            :data:`AUDIT_ROWS_PER_SHARD` rows of every shard, drawn independently of the
            calibration rows, and reported (:class:`LayoutUpdate`).
        full_pass_fraction: an incremental SemDeDup update whose shards were changed or
            removed (not only added) recomputes its touched clusters in full after a uid join
            of ``assignments`` and the stored scores; when those clusters hold at least this
            fraction of the stored rows (a replaced shard of a web crawl touches nearly every
            cluster), every bucket is recomputed instead: the scores of a full recompute,
            without the join (1M rows, a replaced shard touching 988 of 1,000 clusters:
            docs/benchmarks.md). Above 1: never.
        spill: a full build holds the layout's rows per bucket in raw temporary files (under
            ``TMPDIR``, as many bytes as the layout) until every shard is assigned, and writes
            each bucket once, as one file in cluster order (:class:`_BucketSpill`). False: each
            flush appends its rows (no temporary space; every bucket then holds a file per
            flush, and reading a few clusters reads most of it until :func:`compact_layout`).
    """

    clusters_per_bucket: int = DEFAULT_CLUSTERS_PER_BUCKET
    dtype: str = "float32"
    flush_rows: int = DEFAULT_FLUSH_ROWS
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
    block: int = DEFAULT_BLOCK
    with_text: bool = False
    nprobe: int | None = None
    target_recall: float | None = None
    full_pass_fraction: float = DEFAULT_FULL_PASS_FRACTION
    spill: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: got {self.dtype!r}; expected one of {DTYPES}")
        for name in ("clusters_per_bucket", "flush_rows", "memory_budget_bytes", "block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}; expected >= 1")
        if self.nprobe is not None and int(self.nprobe) < 1:
            raise ValueError(f"nprobe: got {self.nprobe}; expected >= 1 or None")
        if self.target_recall is not None and not 0.0 < float(self.target_recall) <= 1.0:
            raise ValueError(f"target_recall: got {self.target_recall}; expected 0 < target_recall <= 1 or None")
        if not float(self.full_pass_fraction) > 0.0:
            raise ValueError(f"full_pass_fraction: got {self.full_pass_fraction}; expected > 0 (above 1: never)")
        if self.target_recall is not None and self.nprobe is not None:
            raise ValueError("nprobe and target_recall: got both; expected at most one (target_recall picks nprobe)")


def text_column(dtype: str) -> str:
    """Name of the caption vector column for ``dtype``."""
    return "text_" + emb_column(dtype)[len("emb_"):]


def emb_column(dtype: str) -> str:
    """Name of the vector column for ``dtype`` (the name says how to decode the bytes)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}; expected one of {DTYPES}")
    return f"emb_{dtype}"


def bucket_names(cluster_ids: np.ndarray, clusters_per_bucket: int) -> pl.Series:
    """(n,) str bucket of each cluster id: ``cluster_id // clusters_per_bucket``, zero-padded."""
    b = np.asarray(cluster_ids, dtype=np.int64) // int(clusters_per_bucket)
    return pl.Series("bucket", b).cast(pl.String).str.zfill(6)


def encode_vectors(x: np.ndarray, dtype: str) -> pa.Array:
    """(n, d) float -> Arrow ``binary`` column, one row's raw little-endian ``dtype`` bytes each."""
    a = np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<"))
    n = a.shape[0]
    width = a.shape[1] * a.itemsize if a.ndim == 2 else 0
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64) if n else np.zeros(1, np.int64)
    arr = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(a.reshape(-1))])
    return arr.cast(pa.binary())


def decode_vectors(col, dtype: str) -> np.ndarray:
    """Inverse of :func:`encode_vectors`: -> contiguous ``(n, d) float32``.

    A single float32 chunk is returned as a view of the Arrow buffer (no copy); several
    chunks are decoded one by one into one output array (one copy, no concatenated column)."""
    if isinstance(col, pa.ChunkedArray):
        chunks = [c for c in col.chunks if len(c)]
        if len(chunks) != 1:
            parts = [_decode_chunk(c, dtype) for c in chunks]
            if not parts:
                return np.zeros((0, 0), np.float32)
            if len({p.shape[1] for p in parts}) != 1:
                raise ValueError("vector column: got rows of different byte lengths; expected one width")
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        col = chunks[0]
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    return _decode_chunk(col, dtype)


def _decode_chunk(col: pa.Array, dtype: str, stored: bool = False) -> np.ndarray:
    """One chunk of a vector column -> ``(n, d) float32`` (``stored``: in the stored ``dtype``,
    a view of the Arrow buffer for either dtype; :class:`RowChunks` converts on gathering)."""
    if col.type not in (pa.binary(), pa.large_binary()):
        col = col.cast(pa.large_binary())
    raw = _fixed_width_bytes(col)
    if raw is None:
        raise ValueError("vector column: got rows of different byte lengths; expected one width")
    vals = raw.reshape(-1).view(np.dtype(dtype).newbyteorder("<")).reshape(len(col), -1)
    return vals if stored else np.ascontiguousarray(vals, dtype=np.float32)


def _fixed_width_bytes(col: pa.Array) -> np.ndarray | None:
    """``(n, w) uint8`` view of a ``binary`` / ``large_binary`` chunk whose values all have w
    bytes (either offset type read as is, no cast: a cast copies); None when the widths differ
    or a value is null."""
    n = len(col)
    off_type = np.int64 if col.type == pa.large_binary() else np.int32
    off = np.frombuffer(col.buffers()[1], dtype=off_type)[col.offset : col.offset + n + 1].astype(np.int64)
    width = int(off[1] - off[0])
    if col.null_count or not np.all(np.diff(off) == width):
        return None
    return np.frombuffer(col.buffers()[2], dtype=np.uint8)[off[0] : off[-1]].reshape(n, width)


# --------------------------------------------------------------------------- k-means on a sample


def embedding_width(lake: Lake, table: str = "embeddings") -> int:
    """The image-vector width ``d`` of a pool table (read through the pool reader from its first
    non-empty partition)."""
    for _p, uids, mats, _enc in iter_pool_partitions(lake, columns=("image",), table=table):  # lazily, first rows
        if len(uids):
            return int(mats["image"].shape[1])
    raise ValueError(f"{table} table: got no rows; expected embedded samples (materialize embeddings first)")


def training_sample(lake: Lake, n_max: int, seed: int = 0, table: str = "embeddings") -> tuple[np.ndarray, int]:
    """A seeded uniform sample of at most ``n_max`` rows of the pool, read partition by partition.

    Returns:
        ``(sample, n_total)``: (m, d) float32 rows (in pool order) and the pool size.
    """
    ds = lake.dataset(table)
    parts = lake.partitions(table)
    counts = np.array([ds.count_rows(filter=pc.field("shard") == p) for p in parts], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"{table} table: got no rows; expected embedded samples (materialize embeddings first)")
    m = min(total, int(n_max))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=m, replace=False)) if m < total else np.arange(total)
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = None
    row = 0
    want = {}
    for i, p in enumerate(parts):
        lo, hi = np.searchsorted(pick, [starts[i], starts[i + 1]])
        if hi > lo:
            want[p] = pick[lo:hi] - starts[i]
    for p, _uids, mats, _enc in iter_pool_partitions(lake, shards=list(want), columns=("image",), table=table):
        rows = mats["image"][want[p]]
        if out is None:
            out = np.empty((m, rows.shape[1]), np.float32)
        out[row : row + len(rows)] = rows
        row += len(rows)
    if row != m:
        raise ValueError(f"{table} table changed while it was sampled ({row} rows read, {m} expected)")
    return out, total


#: the k-means training sample's memory bound (float32 rows): 1 GiB = 524,288 rows of 512
DEFAULT_SAMPLE_BYTES = 1 << 30
#: fewest sample rows per centroid the memory bound may leave (faiss warns below 39)
MIN_POINTS_PER_CENTROID = 39


def sample_rows(k: int, d: int, max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID,
                sample_bytes: int | None = DEFAULT_SAMPLE_BYTES) -> int:
    """Rows of the k-means training sample: ``max_points_per_centroid * k``, bounded by
    ``sample_bytes`` of float32 rows of width ``d`` but never below ``39 * k`` (faiss's floor
    for a usable fit). At k = 10,000, d = 512 the bound gives 524,288 rows (52 per centroid,
    1 GiB) instead of 2,560,000 (5 GiB): the sample, not N, set the peak memory of a 10M fit."""
    rows = max_points_per_centroid * k
    if sample_bytes is None:
        return rows
    return min(rows, max(MIN_POINTS_PER_CENTROID * k, int(sample_bytes) // (4 * d)))


def fit_centroids(
    lake: Lake,
    k: int,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID,
    method: str = "auto",
    gpu: bool | None = None,
    sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
) -> tuple[np.ndarray, int]:
    """Spherical k-means trained on a bounded sample (:func:`sample_rows`: ``max_points_per_centroid
    * k`` rows, at most ``sample_bytes`` of float32 unless that leaves < 39 per centroid).

    Returns:
        ``(centroids, n_total)``: (k, d) float32 unit-norm centroids and the pool size.
    """
    d = embedding_width(lake)
    sample, total = training_sample(lake, sample_rows(k, d, max_points_per_centroid, sample_bytes), seed)
    if not 1 <= k <= total:
        raise ValueError(f"k: got {k}; expected 1 <= k <= n = {total}")
    cent = train_centroids_any(sample, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                               method=method, gpu=gpu)
    return cent, total


# --------------------------------------------------------------------------- writing the layout


@dataclass
class LayoutUpdate:
    """What :func:`build_layout` / :func:`update_layout` did.

    Attributes:
        mode: ``"rebuild"`` (every shard streamed) or ``"incremental"``.
        n_rows: rows of the pool after the update.
        n_new: rows assigned by this update.
        added_shards: shards streamed (new, or changed content).
        removed_shards: shards whose old rows were deleted (changed or gone).
        touched_clusters: (t,) int32 clusters that gained or lost members.
        encoders: encoder ids seen in the streamed partitions.
        rows_written: rows appended to ``pool_by_cluster``.
        assignment: how exact the streamed rows' assignment was (:class:`AssignmentAudit`).
    """

    mode: str
    n_rows: int
    n_new: int
    added_shards: list[str]
    removed_shards: list[str]
    touched_clusters: np.ndarray
    encoders: list[str] = field(default_factory=list)
    rows_written: int = 0
    assignment: "AssignmentAudit | None" = None


@dataclass
class AssignmentAudit:
    """The nearest-centroid assignment of one layout write, checked on a sample of its rows.

    Attributes:
        method: ``"flat"`` (exact by construction) or ``"two-level"``.
        nprobe: coarse cells scanned per row (two-level; None when flat).
        nlist: coarse cells in all (two-level).
        audited: rows checked against the exact nearest centroid (:data:`AUDIT_ROWS_PER_SHARD`
            per shard); hits: of those, rows the assignment put in their exact nearest cluster.
        calibration: the recall per nprobe on the calibration rows when ``target_recall``
            picked nprobe (entry ``p - 1`` for ``nprobe = p``).
    """

    method: str
    nprobe: int | None = None
    nlist: int | None = None
    audited: int = 0
    hits: int = 0
    calibration: list[float] | None = None

    @property
    def recall(self) -> float | None:
        """Fraction of audited rows in their exact nearest cluster (1.0 when flat; None: none audited)."""
        if self.method == "flat":
            return 1.0
        return self.hits / self.audited if self.audited else None

    @property
    def recall_stderr(self) -> float | None:
        """Binomial standard error of :attr:`recall` (the audit is a sample)."""
        r = self.recall
        if self.method == "flat" or r is None:
            return 0.0 if self.method == "flat" else None
        return float(np.sqrt(r * (1.0 - r) / self.audited))

    def metadata(self) -> dict:
        """Flat values for asset metadata."""
        out = {"assign_method": self.method, "assign_recall": self.recall}
        if self.method != "flat":
            out.update(assign_nprobe=self.nprobe, assign_nlist=self.nlist, assign_audited_rows=self.audited,
                       assign_recall_stderr=self.recall_stderr)
        return {k: v for k, v in out.items() if v is not None}


def _audit_rows(shard: str, n: int, m: int, purpose: str = "audit") -> np.ndarray:
    """Up to ``m`` of ``n`` row positions, sorted, seeded by the shard name and ``purpose``
    (the same rows on a re-run; the calibration draws other rows than the audit)."""
    key = str(shard) if purpose == "audit" else f"{purpose}:{shard}"
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    return np.sort(rng.choice(n, size=min(n, m), replace=False)) if n else np.zeros(0, np.int64)


def _calibration_rows(lake: Lake, shards) -> tuple[np.ndarray, list[str]]:
    """:data:`CALIBRATION_ROWS` embedding rows from up to :data:`CALIBRATION_SHARDS` shards
    spread evenly over ``shards`` (None: all), an equal share of each (all rows of a smaller
    shard); and the shards they came from."""
    parts = lake.partitions("embeddings")
    if shards is not None:
        parts = sorted(set(parts) & set(shards))
    if not parts:
        return np.zeros((0, 0), np.float32), []
    m = min(len(parts), CALIBRATION_SHARDS)
    picked = [parts[i] for i in sorted({int(j) for j in np.linspace(0, len(parts) - 1, m).round()})]
    per = -(-CALIBRATION_ROWS // len(picked))
    rows = [mats["image"][_audit_rows(shard, len(uids), per, "calibrate")]
            for shard, uids, mats, _ in iter_pool_partitions(lake, shards=picked, columns=("image",))]
    rows = [r for r in rows if len(r)]
    return (np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)), picked


class _Writer:
    """Buffers per-partition rows and appends them to ``assignments`` and ``pool_by_cluster``.

    With ``spill`` (a full build) the layout rows of each flush go to a :class:`_BucketSpill`
    instead, and :meth:`close` writes them bucket by bucket: every bucket is then one file in
    cluster order. On a local lake the ``assignments`` rows of each flush are then written as a
    data file that is committed only at the end, in one commit right before the layout's: a
    build that fails leaves both tables as they were (the per-flush overwrite-then-append left
    ``assignments`` holding the first flushes only, beside the old layout). Without ``spill``
    (an update) each flush appends its rows, one file per bucket it holds rows of."""

    def __init__(self, lake: Lake, config: LayoutConfig, overwrite: bool, spill: bool = False):
        self.lake, self.config, self.first = lake, config, overwrite
        self.asg: list[pa.Table] = []
        self.vec: list[pa.Table] = []
        self.rows = 0
        self.written = 0
        self.spill = _BucketSpill(config) if spill else None
        self.asg_files: list | None = [] if spill and lake.is_local else None
        self.asg_schema: pa.Schema | None = None

    def add(self, shard: str, uids: pa.Array, x: np.ndarray, ids: np.ndarray, cos: np.ndarray,
            text: np.ndarray | None = None) -> None:
        n = len(uids)
        shard_col = pa.array([shard] * n, pa.string()) if n else pa.array([], pa.string())
        self.asg.append(pa.table({"uid": uids.cast(pa.string()), "shard": shard_col,
                                  "cluster_id": pa.array(ids, pa.int32()), "cos_to_centroid": pa.array(cos, pa.float32())}))
        self.vec.append(pa.table({
            "bucket": bucket_names(ids, self.config.clusters_per_bucket).to_arrow(),
            "cluster_id": pa.array(ids, pa.int32()),
            "uid": binary_uid_column(pl.Series(uids)),
            "shard": shard_col,
            "cos_to_centroid": pa.array(cos, pa.float32()),
            emb_column(self.config.dtype): encode_vectors(x, self.config.dtype),
            **({text_column(self.config.dtype): encode_vectors(text, self.config.dtype)} if self.config.with_text else {}),
        }))
        self.rows += n
        if self.rows >= self.config.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.asg and not self.first:
            return
        mode = "overwrite" if self.first else "append"
        asg = pa.concat_tables(self.asg) if self.asg else None
        if asg is not None:
            if self.asg_files is not None:  # committed by close(), beside the layout
                self.asg_files.append(_write_data_file(self.lake._local_path("assignments"), {}, asg, ["uid"], None,
                                                       int(time.time() * 1000),
                                                       packed=PACKED_COLUMNS["assignments"]))
                self.asg_schema = asg.schema
            else:
                self.lake.write("assignments", asg, mode=mode)
            n = sum(t.num_rows for t in self.vec)
            # the buffered rows are passed as the only reference, so write_layout_rows frees them
            # once it has sorted them (the flush holds one copy of its rows while it sorts, not two)
            if self.spill is not None:
                self.spill.add(_concat_clearing(self.vec))
            else:
                write_layout_rows(self.lake, _concat_clearing(self.vec), mode)
                self.written += n
            self.first = False
        self.asg, self.vec, self.rows = [], [], 0

    def close(self) -> None:
        """Flush the buffer; with a spill, write the layout from it (one file per bucket)."""
        self.flush()
        if self.spill is not None:
            self.written += self.spill.write(self.lake, before_commit=self._commit_assignments)

    def _commit_assignments(self) -> None:
        if self.asg_files:
            replace_table_files(self.lake, "assignments", self.asg_files, self.asg_schema)

    def discard(self) -> None:
        """Delete the spill's temporary files (after :meth:`close`, or after a failure)."""
        if self.spill is not None:
            self.spill.discard()


class _BucketSpill:
    """The ``pool_by_cluster`` rows of a full build, held per bucket in raw temporary files
    (under ``TMPDIR``: as many bytes as the layout) until every shard is assigned, then written
    bucket by bucket.

    Why: a build that appended each flush (``flush_rows`` rows spread over every bucket) left
    one file per flush in every bucket, and in each of them a cluster's rows a short run: at 10M
    rows a bucket had 76 files whose every 1,024-row group held runs of all its 32 clusters, so
    an update touching a few clusters read the whole layout (docs/benchmarks.md). Written from
    the spill, a bucket is one file sorted by cluster; on a local lake its row groups hold
    whole clusters (a cluster of up to ``LAYOUT_ROW_GROUP_ROWS`` rows is one row group) and the
    layout is committed at once. The spill costs one raw write and read of the rows (no Parquet
    encoding), less than compacting the flushed files afterwards (:func:`compact_layout`: a
    Parquet read and write).

    Each bucket keeps one file per column (cluster, cos, shard index, and the raw bytes of the
    uid and of each vector column), appended flush by flush, so a bucket reads back as
    contiguous arrays. Memory holds one flush while it is spilled, and one bucket while it is
    written (on an object store, a group of buckets of about ``flush_rows`` rows); a bucket
    above ``memory_budget_bytes`` is written in pieces of ``flush_rows`` rows, a file each."""

    def __init__(self, config: LayoutConfig):
        self.config = config
        remove_stale_spills()
        self.dir = tempfile.mkdtemp(prefix=SPILL_PREFIX)
        self._owner = _hold_owner_lock(self.dir)
        self.schema: pa.Schema | None = None
        self.widths: dict[str, int] = {}  # raw column -> bytes per row
        self.shards: dict[str, int] = {}
        self.counts: dict[int, int] = {}

    def _path(self, bucket: int, column: str) -> str:
        return os.path.join(self.dir, f"{bucket}.{column}")

    def _columns(self) -> dict[str, tuple[np.dtype, int]]:
        """``{column: (dtype, values per row)}`` of the spill files."""
        return {"cluster_id": (np.dtype("<i4"), 1), "cos_to_centroid": (np.dtype("<f4"), 1), "shard": (np.dtype("<i4"), 1),
                **{c: (np.dtype(np.uint8), w) for c, w in self.widths.items()}}

    def add(self, rows: pa.Table) -> None:
        """Append a flush's rows (the columns :class:`_Writer` builds) to their buckets' files."""
        if rows.num_rows == 0:
            return
        if self.schema is None:
            self.schema = rows.schema
        cid = rows.column("cluster_id").to_numpy()
        bucket = cid.astype(np.int64) // int(self.config.clusters_per_bucket)
        order = np.argsort(bucket, kind="stable")
        ids, starts = np.unique(bucket[order], return_index=True)
        shard = rows.column("shard").combine_chunks().dictionary_encode()
        index = np.array([self.shards.setdefault(v, len(self.shards)) for v in shard.dictionary.to_pylist()], np.int32)
        cols = {"cluster_id": cid[order], "cos_to_centroid": rows.column("cos_to_centroid").to_numpy()[order],
                "shard": index[shard.indices.to_numpy()][order]}
        for c in _raw_columns(rows.column_names):
            # the bytes in bucket order, one scatter per chunk (no concatenated column)
            cols[c] = _take_fixed_width(rows.column(c), order, as_bytes=True)
            if cols[c] is None or self.widths.setdefault(c, cols[c].shape[1]) != cols[c].shape[1]:
                raise ValueError(f"{LAYOUT_TABLE}: got {c} values of different byte widths; expected one width")
        del rows
        for b, a, e in zip(ids.tolist(), starts.tolist(), [*starts[1:].tolist(), order.size]):
            for c, v in cols.items():
                with open(self._path(b, c), "ab") as f:
                    v[a:e].tofile(f)
            self.counts[b] = self.counts.get(b, 0) + (e - a)

    def _pieces(self):
        """``(bucket name, rows, in pieces)`` of every spilled bucket in bucket order: the bucket
        whole, or its pieces (:meth:`_steps`); a bucket's files are deleted once read."""
        for b in sorted(self.counts):
            steps = self._steps(self.counts[b])
            for start, count in steps:
                yield self._bucket_name(b), self._table(b, start, count), len(steps) > 1
            for c in self._columns():
                os.unlink(self._path(b, c))

    def _bucket_name(self, bucket: int) -> str:
        cpb = self.config.clusters_per_bucket
        return bucket_names(np.array([bucket * cpb]), cpb)[0]

    def _table(self, bucket: int, start: int, count: int) -> pa.Table:
        """Rows ``start .. start + count`` of a bucket's files, in cluster / SemDeDup order."""
        v = {}
        for c, (dtype, per_row) in self._columns().items():
            x = np.fromfile(self._path(bucket, c), dtype, count=count * per_row, offset=start * per_row * dtype.itemsize)
            v[c] = x.reshape(count, per_row) if per_row > 1 else x
        order = semdedup_order(v["cos_to_centroid"], v["uid"], v["cluster_id"])
        cols = {"bucket": pa.repeat(self._bucket_name(bucket), count), "cluster_id": pa.array(v["cluster_id"][order]),
                "cos_to_centroid": pa.array(v["cos_to_centroid"][order]),
                "shard": pa.array(list(self.shards), pa.string()).take(pa.array(v["shard"][order]))}
        for c in self.widths:
            cols[c] = _fixed_binary(v.pop(c)[order])
        return pa.table({f.name: cols[f.name].cast(f.type) for f in self.schema}, schema=self.schema)

    def write(self, lake: Lake, before_commit=None) -> int:
        """Write every spilled bucket, deleting each bucket's files once read; returns the rows
        written. A local lake gets each bucket as one data file whose row groups hold whole
        clusters (:func:`cluster_row_groups`), and the whole layout in ONE commit that replaces
        the old one (a build killed before it leaves the old layout as it was), made right after
        ``before_commit()``; elsewhere the buckets go through the Delta writer in groups of about
        ``flush_rows`` rows, the first group overwriting the table."""
        if self.schema is None:
            return 0
        return self._commit_files(lake, before_commit) if lake.is_local else self._write_groups(lake, before_commit)

    def _write_groups(self, lake: Lake, before_commit=None) -> int:
        if before_commit is not None:  # no one commit here: the first group replaces the table
            before_commit()
        group: list[pa.Table] = []
        rows = written = 0
        mode = "overwrite"
        for _name, t, pieced in self._pieces():
            group.append(t)
            rows += t.num_rows
            del t
            if rows >= self.config.flush_rows or pieced:
                write_layout_rows(lake, _concat_clearing(group), mode, presorted=True)
                mode, written, rows = "append", written + rows, 0
        if group:
            write_layout_rows(lake, _concat_clearing(group), mode, presorted=True)
            written += rows
        return written

    def _steps(self, n: int) -> list[tuple[int, int]]:
        """``(start, count)`` reads of a bucket of ``n`` rows: all at once, or pieces of
        ``flush_rows`` rows when the bucket is above ``memory_budget_bytes``."""
        row_bytes = sum(dtype.itemsize * per_row for dtype, per_row in self._columns().values())
        if n * row_bytes <= self.config.memory_budget_bytes:
            return [(0, n)]
        piece = max(1, int(self.config.flush_rows))
        return [(a, min(piece, n - a)) for a in range(0, n, piece)]

    def _commit_files(self, lake: Lake, before_commit=None) -> int:
        root = lake._local_path(LAYOUT_TABLE)
        raw = _raw_columns(self.schema.names)
        now = int(time.time() * 1000)
        adds, written = [], 0
        for name, t, _pieced in self._pieces():
            t = t.drop_columns(["bucket"])
            bounds = cluster_row_groups(t.column("cluster_id").to_numpy(), LAYOUT_ROW_GROUP_ROWS)
            adds.append(_write_data_file(root, {"bucket": name}, t, raw, None, now, groups=bounds,
                                         packed=PACKED_COLUMNS[LAYOUT_TABLE]))
            written += t.num_rows
            del t
        if before_commit is not None:
            before_commit()
        replace_table_files(lake, LAYOUT_TABLE, adds, self.schema, ["bucket"])
        return written

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        if self._owner is not None:
            self._owner.close()  # releases the lock
            self._owner = None


#: the spill directories' name prefix under ``TMPDIR`` (see :func:`remove_stale_spills`)
SPILL_PREFIX = "pool_by_cluster_spill_"
_OWNER_FILE = ".owner"


def _hold_owner_lock(spill_dir: str):
    """Take an exclusive ``flock`` on the spill's owner file and keep it while the spill lives
    (None where ``fcntl`` is missing). The kernel drops the lock when the process dies, SIGKILL
    and OOM kills included, so a spill whose lock can be taken has no live owner."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no stale-spill cleanup
        return None
    f = open(os.path.join(spill_dir, _OWNER_FILE), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # a filesystem without flock: the spill is kept by every cleanup (it cannot lock it either)
        log.info("spill %s: no owner lock (%s); a killed build's spill here is not cleaned up", spill_dir, e)
        f.close()
        return None
    return f


def remove_stale_spills(tmp_dir: str | None = None, grace_s: float = 60.0) -> list[str]:
    """Delete the spill directories under ``tmp_dir`` (default: ``TMPDIR``) that no live build
    owns: a build killed before its cleanup ran (SIGKILL, an OOM kill, a lost machine) leaves
    its spill behind, as large as the layout (~20 GB at 10M rows). A spill is stale when its
    owner lock can be taken (:func:`_hold_owner_lock`), or when it has had no owner file for
    ``grace_s`` seconds (a build killed between creating it and locking it). Runs at the start
    of every spilled build; returns the directories removed."""
    import shutil

    try:
        import fcntl
    except ImportError:
        return []
    root = tmp_dir or tempfile.gettempdir()
    removed = []
    try:
        names = [e.name for e in os.scandir(root) if e.name.startswith(SPILL_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    for name in names:
        path = os.path.join(root, name)
        owner = os.path.join(path, _OWNER_FILE)
        try:
            f = open(owner, "r")
        except FileNotFoundError:
            try:
                stale = time.time() - os.stat(path).st_mtime > grace_s
            except OSError:
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        except OSError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live build
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.warning("removed %d spill directories of killed layout builds: %s", len(removed), removed)
    return removed


def replace_table_files(lake: Lake, table: str, adds: list, schema: pa.Schema, partition_by: list[str] | None = None) -> None:
    """Make the data files ``adds`` (``AddAction`` of :func:`_write_data_file`, written but not
    committed) the whole of the local ``table``, in ONE commit: it replaces every file and the
    schema (a new dtype or caption column), or creates the table."""
    from deltalake import Schema
    from deltalake.transaction import create_table_with_add_actions

    if lake.exists(table):
        lake.table(table).create_write_transaction(adds, mode="overwrite", schema=schema, partition_by=partition_by)
    else:
        create_table_with_add_actions(lake.uri(table), Schema.from_arrow(schema), adds, partition_by=partition_by)


def _concat_clearing(tables: list[pa.Table]) -> pa.Table:
    """``pa.concat_tables(tables)`` (no copy), emptying the list: the result holds the only references."""
    out = pa.concat_tables(tables)
    tables.clear()
    return out


def _sorted_by_cluster(rows: pa.Table, fixed: list[str]) -> pa.Table:
    """``rows`` sorted by cluster (and so by bucket, ``cluster_id // clusters_per_bucket``) and
    inside a cluster in SemDeDup order (cos_to_centroid ascending, ties by uid): a reader then
    finds each cluster's rows of one record batch as one run already in that order, and copies
    it whole (:class:`RowChunks`). The ``fixed`` columns (uids, vectors: every value the same
    byte width) are gathered by numpy from their chunks into one new buffer; Arrow's ``take``
    on a chunked binary column concatenates it first, a third copy of the flush (+0.85 GiB
    peak at 1M)."""
    order = semdedup_order(rows.column("cos_to_centroid").to_numpy(), binary_column_to_bytes(rows.column("uid")),
                           rows.column("cluster_id").to_numpy())
    cols = {}
    for name in rows.column_names:
        col = rows.column(name)
        cols[name] = _take_fixed_width(col, order) if name in fixed else col.take(pa.array(order))
    # in batches (zero-copy slices): the Delta writer splits each batch by partition, a copy of
    # the batch; one 131k-row batch would be split (copied) all at once
    return pa.Table.from_batches(pa.table(cols, schema=rows.schema).to_batches(max_chunksize=8192))


def _take_fixed_width(col: pa.ChunkedArray, order: np.ndarray, as_bytes: bool = False) -> pa.Array | np.ndarray | None:
    """Rows ``order`` of a binary column whose values all have one width, as one array of the
    column's type over a single new buffer (one scatter per chunk); ``as_bytes``: that buffer
    as ``(n, width) uint8``, or None when the values' widths differ."""
    parts = [_fixed_width_bytes(ch) for ch in col.chunks if len(ch)]
    if any(p is None for p in parts) or len({p.shape[1] for p in parts}) != 1:
        return None if as_bytes else col.take(pa.array(order))  # not fixed width: Arrow's take
    out = np.empty((order.size, parts[0].shape[1]), np.uint8)
    pos = np.empty(order.size, np.int64)
    pos[order] = np.arange(order.size)
    start = 0
    for part in parts:
        out[pos[start : start + part.shape[0]]] = part
        start += part.shape[0]
    return out if as_bytes else _fixed_binary(out).cast(col.type)


def write_layout_rows(lake: Lake, rows: pa.Table, mode: str, presorted: bool = False) -> None:
    """Append (or overwrite with) ``pool_by_cluster`` rows, partitioned by bucket.

    Parquet pages are written UNCOMPRESSED: the vector bytes do not compress (snappy saves
    < 1% on float32 embeddings) and reading a bucket is then ~3-8x faster (measured in
    docs/benchmarks.md). The vector and uid columns are PLAIN, without a dictionary or
    statistics (unique random bytes: the writer otherwise fills a 1 MB dictionary page per
    file before it falls back, and stores 2 KiB min/max values nobody filters on): writes
    ~30% faster, reads ~10% (131k rows x 512, 32 buckets, this machine).

    Rows are written sorted by (bucket, cluster, SemDeDup order) in row groups of
    ``LAYOUT_ROW_GROUP_ROWS``, so a file's ``cluster_id`` statistics say which row groups hold
    a cluster: reading a few clusters of a bucket (an incremental update touching them) skips
    the others' row groups instead of reading the whole bucket. ``presorted``: ``rows`` are in
    that order already (buckets read back from a build's spill, :class:`_BucketSpill`).
    """
    from deltalake import write_deltalake

    if lake.is_local:
        os.makedirs(lake.root, exist_ok=True)
    kwargs = {"schema_mode": "overwrite"} if mode == "overwrite" else {}
    raw = _raw_columns(rows.column_names)
    props = _layout_writer_properties(raw)
    if presorted:  # in batches, as _sorted_by_cluster leaves them
        rows = pa.Table.from_batches(rows.to_batches(max_chunksize=8192), schema=rows.schema)
    elif rows.num_rows > 1:
        rows = _sorted_by_cluster(rows, raw)
    write_deltalake(lake.uri(LAYOUT_TABLE), rows, mode=mode, partition_by=["bucket"],
                    storage_options=dict(lake.storage_options) or None, writer_properties=props, **kwargs)


def _raw_columns(names) -> list[str]:
    """The layout's columns of unique fixed-width bytes (uid, vectors): written PLAIN."""
    return [c for c in names if c == "uid" or c.startswith(("emb_", "text_"))]


def _layout_writer_properties(raw: list[str]):
    """Parquet settings of every ``pool_by_cluster`` file (see :func:`write_layout_rows`); its
    :data:`curation.storage.lake.PACKED_COLUMNS` PLAIN without a dictionary."""
    return plain_writer_properties(raw, max_row_group_size=LAYOUT_ROW_GROUP_ROWS, packed=PACKED_COLUMNS[LAYOUT_TABLE])


@dataclass
class LayoutCompaction:
    """Result of :func:`compact_layout`: buckets rewritten, their data files before and after,
    and the data files of the whole layout after it (``layout_files``)."""

    buckets: list[str]
    files_before: int
    files_after: int
    seconds: float
    layout_files: int = 0


def layout_files_per_bucket(lake: Lake) -> dict[str, int]:
    """``{bucket: data files}`` of the current ``pool_by_cluster`` version (from its log)."""
    return {b: len(paths) for b, paths in lake.partition_files(LAYOUT_TABLE).items()}


def buckets_to_compact(counts: dict[str, int], min_files: int, buckets=None) -> list[str]:
    """The buckets of ``counts`` (``{bucket: data files}``; only those in ``buckets`` when
    given) holding at least ``min_files`` files: what :func:`compact_layout` rewrites."""
    want = set(counts) if buckets is None else set(buckets) & set(counts)
    return sorted(b for b in want if counts[b] >= int(min_files))


def compact_layout(lake: Lake, min_files: int = 2, buckets=None) -> LayoutCompaction:
    """Rewrite each bucket of ``pool_by_cluster`` holding at least ``min_files`` data files as
    one file sorted by cluster: Delta's OPTIMIZE ZORDER BY cluster_id (a conflict-checked
    commit with ``dataChange = false`` that removes only the files it rewrote: the rows, and so
    every score computed from them, stay the same, and rows appended meanwhile stay too).

    Why: the layout is written in flushes of ``flush_rows`` and every incremental update appends
    a file per touched bucket, so one cluster's rows lie in every flush's file of its bucket,
    and each row group of those files holds runs of several clusters: reading a few clusters
    (the add-only update of a topical shard) reads ~5-8x their bytes at 1M and up to the whole
    bucket at 10M (docs/benchmarks.md). After compaction a cluster lies in one or two row
    groups (1M: 24 clusters' add-only update read 165 instead of 406 MiB). The rewrite costs a read
    and a write of the compacted buckets (3.4 s for the whole 1M layout), so it runs when asked
    (``concept_clusters``' ``compact_min_files``), not in every update.

    Args:
        min_files: compact only buckets with at least this many files (>= 2).
        buckets: only these buckets (None: every bucket).
    """
    if int(min_files) < 2:
        raise ValueError(f"min_files: got {min_files}; expected >= 2 (one file is compact already)")
    t = time.perf_counter()
    if not lake.exists(LAYOUT_TABLE):
        raise ValueError(f"{LAYOUT_TABLE}: got no table; expected a layout (materialize concept_clusters first)")
    counts = layout_files_per_bucket(lake)
    todo = buckets_to_compact(counts, min_files, buckets)
    before = sum(counts[b] for b in todo)
    if todo:
        dt = lake.table(LAYOUT_TABLE)
        raw = _raw_columns(pa.schema(dt.schema().to_arrow()).names)
        # one partition at a time in memory (a bucket: ~64 MiB at the default 32 clusters of
        # ~1,000 members), one commit for all of them; files up to 1 GiB so a bucket stays one file
        dt.optimize.z_order(["cluster_id"], partition_filters=[("bucket", "in", todo)], target_size=1 << 30,
                            max_concurrent_tasks=1, writer_properties=_layout_writer_properties(raw))
    after = layout_files_per_bucket(lake)
    return LayoutCompaction(todo, before, sum(after.get(b, 0) for b in todo), time.perf_counter() - t,
                            sum(after.values()))


def _stream_assign(lake: Lake, centroids: np.ndarray, config: LayoutConfig, shards, writer: _Writer,
                   assign_method: str, gpu) -> tuple[int, set[int], set[str], AssignmentAudit]:
    n = 0
    touched: set[int] = set()
    encoders: set[str] = set()
    cols = ("image", "text") if config.with_text else ("image",)
    # two-level cells trained once, not per shard
    assign_rows = assigner(centroids, method=assign_method, gpu=gpu, nprobe=config.nprobe)
    two = isinstance(assign_rows, TwoLevelAssigner)
    audit = AssignmentAudit("two-level", assign_rows.nprobe, assign_rows.nlist) if two else AssignmentAudit("flat")
    if two and config.target_recall is not None:
        xc, picked = _calibration_rows(lake, shards)
        if len(xc) and xc.shape[1] == centroids.shape[1]:  # a width mismatch is reported by the loop below
            curve = assign_rows.calibrate(xc, config.target_recall)
            audit.nprobe, audit.calibration = assign_rows.nprobe, [round(float(v), 4) for v in curve]
            log.info("two-level assignment: nprobe %d of %d cells for recall >= %.3f (%.3f on %d rows of %d shards)",
                     assign_rows.nprobe, assign_rows.nlist, config.target_recall, curve[assign_rows.nprobe - 1],
                     len(xc), len(picked))
        del xc
    for shard, uids, mats, enc in iter_pool_partitions(lake, shards=shards, columns=cols):
        encoders |= enc
        if len(encoders) > 1:
            raise ValueError(f"embeddings from different encoders: {sorted(encoders)}; re-embed the shards with one encoder")
        x = mats["image"]
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(f"shard {shard!r}: got {x.shape[1]}-dim embeddings; expected {centroids.shape[1]} (the centroids')")
        ids, cos = assign_rows(x)
        if two and len(x):  # a few rows of every shard against the exact nearest centroid
            pick = _audit_rows(shard, len(x), AUDIT_ROWS_PER_SHARD)
            audit.hits += int((exact_nearest(x[pick], centroids)[0] == ids[pick]).sum())
            audit.audited += int(pick.size)
        touched |= set(np.unique(ids).tolist())
        writer.add(shard, uids, x, ids, cos, mats.get("text"))
        n += len(uids)
    writer.close()
    if two and audit.audited:
        log.info("two-level assignment: recall %.3f +- %.3f (nprobe %d of %d cells; %d audited rows)",
                 audit.recall, audit.recall_stderr, audit.nprobe, audit.nlist, audit.audited)
    return n, touched, encoders, audit


def _write_shard_state(lake: Lake, fps: dict[str, str], config: LayoutConfig, layout_id: str) -> None:
    """``layout_id``: new for every :func:`build_layout` (new centroids or settings), kept by
    :func:`update_layout`; scores computed on another layout are never updated in place.

    Also checkpoints ``pool_by_cluster``'s log (one Parquet file instead of a JSON commit per
    flush: every bucket reader opens the table)."""
    if lake.exists(LAYOUT_TABLE):
        lake.table(LAYOUT_TABLE).create_checkpoint()
    lake.write(SHARDS_TABLE, pl.DataFrame({
        "shard": pl.Series(sorted(fps), dtype=pl.String),
        "fingerprint": pl.Series([fps[s] for s in sorted(fps)], dtype=pl.String),
        "clusters_per_bucket": pl.Series([config.clusters_per_bucket] * len(fps), dtype=pl.Int32),
        "dtype": pl.Series([config.dtype] * len(fps), dtype=pl.String),
        "with_text": pl.Series([config.with_text] * len(fps), dtype=pl.Boolean),
        "layout_id": pl.Series([layout_id] * len(fps), dtype=pl.String),
    }))


def build_layout(lake: Lake, centroids: np.ndarray, config: LayoutConfig = LayoutConfig(),
                 assign_method: str = "auto", gpu: bool | None = None) -> LayoutUpdate:
    """Assign every row (streaming) and write ``assignments`` + ``pool_by_cluster`` from scratch."""
    fps = partition_fingerprints(lake)
    writer = _Writer(lake, config, overwrite=True, spill=config.spill)
    try:
        n, _touched, enc, audit = _stream_assign(lake, centroids, config, None, writer, assign_method, gpu)
    finally:
        writer.discard()
    if n == 0:
        raise ValueError("embeddings table: got no rows; expected embedded samples (materialize embeddings first)")
    _write_shard_state(lake, fps, config, uuid.uuid4().hex)
    return LayoutUpdate("rebuild", n, n, sorted(fps), [], np.arange(centroids.shape[0], dtype=np.int32),
                        sorted(enc), writer.written, audit)


def _layout_shards(state: pl.DataFrame, assignments_version: int | None = None) -> pl.DataFrame:
    """The layout's shard fingerprints and id (and, when given, the ``assignments`` version):
    what ``dedup_scores_shards`` records and :func:`_shard_diff` compares against."""
    out = state.select("shard", "fingerprint").with_columns(pl.lit(_layout_id(state)).alias("layout_id"))
    if assignments_version is not None:
        out = out.with_columns(pl.lit(assignments_version, pl.Int64).alias("assignments_version"))
    return out


def _layout_id(state: pl.DataFrame | None) -> str:
    """The layout's id ("" for a layout written before ids existed)."""
    if state is None or "layout_id" not in state.columns or state.height == 0:
        return ""
    return str(state["layout_id"][0])


def layout_clusters_per_bucket(lake: Lake) -> int:
    """The layout's ``clusters_per_bucket`` (one value; raises when the state disagrees)."""
    state = layout_state(lake)
    cpb = sorted(set(state["clusters_per_bucket"].to_list())) if state is not None else []
    if len(cpb) != 1:
        raise ValueError(f"{LAYOUT_TABLE}: got clusters_per_bucket {cpb}; expected one layout")
    return int(cpb[0])


def layout_state(lake: Lake) -> pl.DataFrame | None:
    """The shard fingerprints the layout was written from (None: no layout yet)."""
    if not (lake.exists(SHARDS_TABLE) and lake.exists(LAYOUT_TABLE) and lake.exists("assignments")):
        return None
    return lake.read(SHARDS_TABLE)


def _in_list(col: str, values) -> str:
    return f"{col} IN (" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in values) + ")"


def update_layout(lake: Lake, centroids: np.ndarray, config: LayoutConfig = LayoutConfig(),
                  assign_method: str = "auto", gpu: bool | None = None) -> LayoutUpdate:
    """Incremental: stream only new or changed shards; delete rows of changed or gone shards.

    Falls back to :func:`build_layout` when no layout exists yet.

    Raises:
        ValueError: the existing layout was written with other ``clusters_per_bucket``/``dtype``.
    """
    state = layout_state(lake)
    if state is None or state.height == 0:
        return build_layout(lake, centroids, config, assign_method, gpu)
    cpb = set(state["clusters_per_bucket"].to_list())
    dts = set(state["dtype"].to_list())
    wt = set(state["with_text"].to_list()) if "with_text" in state.columns else {False}
    if cpb != {config.clusters_per_bucket} or dts != {config.dtype} or wt != {config.with_text}:
        raise ValueError(f"layout: got clusters_per_bucket={config.clusters_per_bucket}, dtype={config.dtype!r}; "
                         f"the layout was written with {sorted(cpb)}, {sorted(dts)}; expected the same or mode 'retrain'")
    fps = partition_fingerprints(lake)
    old = dict(zip(state["shard"].to_list(), state["fingerprint"].to_list()))
    new = sorted(s for s in fps if s not in old)
    changed = sorted(s for s in fps if s in old and old[s] != fps[s])
    gone = sorted(s for s in old if s not in fps)
    removed = changed + gone
    touched: set[int] = set()
    if removed:
        rm = rows_of_shards(lake, "assignments", removed, ["cluster_id"])
        touched |= set(pc.unique(rm.column("cluster_id")).to_pylist())
        # the layout first: a run killed between the two finds the removed rows in assignments
        # again, and the layout's buckets without them (nothing left to drop there)
        drop_shard_rows(lake, LAYOUT_TABLE, removed)
        drop_shard_rows(lake, "assignments", removed)
    writer = _Writer(lake, config, overwrite=False)
    n_new, t_new, enc, audit = (_stream_assign(lake, centroids, config, new + changed, writer, assign_method, gpu)
                                if (new or changed) else (0, set(), set(), None))
    touched |= t_new
    _write_shard_state(lake, fps, config, _layout_id(state))
    n_rows = lake.count_rows("assignments")
    log.info("layout update: %d new rows from %d shards, %d shards removed, %d clusters touched",
             n_new, len(new) + len(changed), len(removed), len(touched))
    return LayoutUpdate("incremental", n_rows, n_new, new + changed, removed,
                        np.array(sorted(touched), dtype=np.int32), sorted(enc), writer.written, audit)


def rows_of_shards(lake: Lake, table: str, shards: list[str], columns: list[str], dt=None) -> pa.Table:
    """The rows (``columns``) of ``table`` (of its open snapshot ``dt`` when given: an older
    version) whose ``shard`` column (not its partition) is one of ``shards``: files picked by
    the Delta log's min/max ``shard`` statistics, rows by a mask.

    No string filter in the Parquet scan: a file that deltalake's DELETE rewrote (1.4 and
    later, delta-io/delta-rs#4579) stores strings as ``string_view``, and pyarrow has no kernel
    to compare those row-group statistics with a string (``ArrowNotImplementedError``): the
    next update after a shard was replaced failed reading ``assignments``."""
    want = pa.array(sorted(set(shards)), pa.string())
    if not len(want):
        return pa.table({c: pa.array([], lake.dataset(table, dt).schema.field(c).type) for c in columns})
    ds = lake.dataset(table, dt, file_pruning_predicate=[("shard", "in", want.to_pylist())])
    t = ds.to_table(columns=list(dict.fromkeys([*columns, "shard"])))
    return t.filter(pc.is_in(t.column("shard").cast(pa.string()), value_set=want)).select(columns)


def drop_shard_rows(lake: Lake, table: str, shards: list[str]) -> int:
    """Remove the rows of ``shards`` (its ``shard`` column) from ``pool_by_cluster`` or
    ``assignments``; returns the data files rewritten (-1 on an object store: see below).

    Each file holding a removed row is rewritten without it in the table's own format (the
    layout: uncompressed PLAIN pages, the rows keeping their cluster / SemDeDup order in row
    groups of whole clusters of up to 1,024 rows; assignments: uncompressed, uid PLAIN), and all the files are swapped in
    ONE commit (their removes and adds): the files deltalake's DELETE would rewrite (at 1M
    rows, a replaced shard's rows lie in one flush file per bucket), no more. Candidate files
    come from deltalake's pruning by the log's min/max ``shard``; their ``shard`` column tells
    which hold one.

    Not deltalake's DELETE on a local lake: it rewrites through DataFusion's writer, which
    (1.6.6) drops that format (ZSTD, one row group per file: a cluster read then decompresses
    the whole file) and stores ``string_view``/``binary_view`` columns that pyarrow cannot
    filter on (delta-io/delta-rs#4579). A lake on an object store still goes through the
    DELETE (such files are read as they are; ``compact_layout`` rewrites the layout's)."""
    import pyarrow.parquet as pq
    from deltalake.transaction import RemoveAction

    want = sorted(set(shards))
    if not want or not lake.exists(table):
        return 0
    dt = lake.table(table)
    if not lake.is_local:
        dt.delete(_in_list("shard", want))
        return -1
    part = TABLES[table]
    schema = pa.schema(dt.schema().to_arrow())
    file_schema = pa.schema([f for f in schema if f.name != part])
    raw = _raw_columns(file_schema.names) if table == LAYOUT_TABLE else ["uid"] if table in UID_PLAIN_TABLES else []
    group_rows = LAYOUT_ROW_GROUP_ROWS if table == LAYOUT_TABLE else None
    value_set = pa.array(want, pa.string())
    root = lake._local_path(table)
    now = int(time.time() * 1000)
    actions: list = []
    # deltalake's own pruning by the log's min/max shard (a superset; it knows how its stats
    # were written, truncated strings included)
    cand = {os.path.normpath(u) for u in dt.file_uris(file_pruning_predicate=[("shard", "in", want)])}
    for add in pa.table(dt.get_add_actions(flatten=True)).to_pylist():
        path = os.path.normpath(os.path.join(root, add["path"]))
        if path not in cand:
            continue
        # the shard column first (a compacted bucket's one file spans every shard's range)
        gone = pc.is_in(pq.read_table(path, columns=["shard"]).column("shard").cast(pa.string()), value_set=value_set)
        if not pc.any(gone).as_py():
            continue
        t = pq.read_table(path).filter(pc.invert(gone)).select(file_schema.names)
        if t.schema != file_schema:  # a file a DELETE rewrote before: view types
            t = t.cast(file_schema)
        pv = {part: add[f"partition.{part}"]} if part else {}
        actions.append(RemoveAction(add["path"], True, now, add["size_bytes"], pv))
        if t.num_rows:  # a layout file keeps its cluster order: row groups of whole clusters
            bounds = cluster_row_groups(t.column("cluster_id").to_numpy(), group_rows) if table == LAYOUT_TABLE else None
            actions.append(_write_data_file(root, pv, t, raw, group_rows, now, groups=bounds,
                                            packed=PACKED_COLUMNS.get(table, ())))
    if actions:
        dt.create_write_transaction(actions, mode="append", schema=dt.schema(), partition_by=[part] if part else None)
    return sum(isinstance(x, RemoveAction) for x in actions)


def _write_data_file(root: str, pv: dict, t: pa.Table, raw: list[str], group_rows: int | None, now: int,
                     groups: list[int] | None = None, packed=()):
    """Write ``t`` (a partition's rows, without the partition column) as a new data file of the
    local Delta table at ``root`` in the table's own format: uncompressed pages, the ``raw``
    columns PLAIN without dictionary or statistics, the ``packed`` ones PLAIN without dictionary
    (statistics kept), row groups of ``group_rows`` rows (or
    bounded by the row offsets ``groups``: ``[0, ..., t.num_rows]``); returns its ``AddAction``
    (min/max statistics of the other columns, for deltalake's file pruning), not committed."""
    import json

    import pyarrow.parquet as pq
    from deltalake.transaction import AddAction

    stat_cols = [c for c in t.column_names if c not in raw]
    rel = "/".join([*(f"{k}={v}" for k, v in pv.items()), f"part-00000-{uuid.uuid4()}-c000.parquet"])
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    packed = [c for c in packed if c in stat_cols]
    kw = dict(compression="NONE", use_dictionary=[c for c in stat_cols if c not in packed],
              column_encoding={c: "PLAIN" for c in [*raw, *packed]}, write_statistics=stat_cols)
    if groups is None:
        pq.write_table(t, path, row_group_size=group_rows, **kw)
    else:
        with pq.ParquetWriter(path, t.schema, **kw) as w:
            for a, b in zip(groups[:-1], groups[1:]):
                w.write_table(t.slice(a, b - a), row_group_size=b - a)
    stats = {"numRecords": t.num_rows,
             "minValues": {c: pc.min(t.column(c)).as_py() for c in stat_cols},
             "maxValues": {c: pc.max(t.column(c)).as_py() for c in stat_cols},
             "nullCount": {c: t.column(c).null_count for c in t.column_names}}
    return AddAction(rel, os.path.getsize(path), pv, now, True, json.dumps(stats))


def cluster_row_groups(cluster_ids: np.ndarray, limit: int) -> list[int]:
    """Row-group bounds ``[0, ..., n]`` for rows sorted by cluster: whole clusters packed into
    groups of at most ``limit`` rows, a cluster above ``limit`` split into groups of ``limit``
    (so a cluster of at most ``limit`` rows lies in ONE row group, and reading it reads that
    group only)."""
    n = int(cluster_ids.size)
    if n == 0:
        return [0]
    starts = (np.flatnonzero(np.diff(cluster_ids) != 0) + 1).tolist()
    bounds, group_start = [0], 0
    for a, b in zip([0, *starts], [*starts, n]):
        if b - group_start > limit and a > group_start:  # the cluster does not fit: close the group
            bounds.append(a)
            group_start = a
        while b - group_start > limit:  # a cluster above the limit: groups of limit rows
            group_start += limit
            bounds.append(group_start)
    if bounds[-1] != n:
        bounds.append(n)
    return bounds


# --------------------------------------------------------------------------- reading buckets


@dataclass
class BucketRows:
    """Rows of one bucket (or some of its clusters).

    Attributes:
        uids: (n, 16) uint8 compact uids; cluster_ids: (n,) int32; cos: (n,) float32;
        x: (n, d) float32 vectors (None when not read).
    """

    uids: np.ndarray
    cluster_ids: np.ndarray
    cos: np.ndarray
    x: np.ndarray | None


def layout_dtype(lake: Lake, dt=None) -> str:
    """The vector dtype of the ``pool_by_cluster`` table (from its column name; of the open
    snapshot ``dt`` when given)."""
    names = (dt if dt is not None else lake.table(LAYOUT_TABLE)).schema().to_arrow()
    names = [f.name for f in pa.schema(names)]
    for dtype in DTYPES:
        if emb_column(dtype) in names:
            return dtype
    raise ValueError(f"{LAYOUT_TABLE}: got columns {names}; expected one of {[emb_column(d) for d in DTYPES]}")


class RowChunks:
    """An ``(n, d)`` matrix held as the record-batch chunks it was read in, as stored (views of
    the Arrow buffers: float32, or float16 for a float16 layout): ``m[idx]`` gathers rows into
    one float32 array without first concatenating the chunks (a copy of the whole bucket); a
    float16 chunk is converted in the same pass (not decoded to a float32 copy first, then
    gathered: one pass over the bucket instead of two, and half its memory held)."""

    def __init__(self, chunks: list[np.ndarray]):
        self.chunks = chunks
        self.starts = np.cumsum([0] + [c.shape[0] for c in chunks])
        self.shape = (int(self.starts[-1]), chunks[0].shape[1] if chunks else 0)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((idx.size, self.shape[1]), np.float32)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for k in np.unique(which).tolist():
            dest = np.flatnonzero(which == k)
            local = idx[dest] - self.starts[k]
            a, b = int(local[0]), int(local[-1]) + 1
            if b - a == local.size and (local.size == 1 or bool(np.all(local[1:] > local[:-1]))):
                out[dest] = self.chunks[k][a:b]  # one run in order (how write_layout_rows sorts): one copy
            else:
                out[dest] = self.chunks[k][local]
        return out

    def matmul_rows(self, idx: np.ndarray, y: np.ndarray, min_run: int = MATMUL_MIN_RUN,
                    max_piece: int | None = None) -> np.ndarray:
        """``self[idx] @ y.T`` for increasing row numbers ``idx``, ``(idx.size, m)`` float32,
        multiplied run by run straight from the chunks (a run: consecutive rows of one chunk;
        one cluster of a layout file is one run) instead of gathering the rows first: the
        add-only update multiplies every touched cluster by its few new members, so the gather
        was a copy of each cluster for a product ~100x smaller than it. A run is multiplied in
        pieces of ``max_piece`` rows (default :func:`piece_rows`: where numpy's OpenBLAS has a
        direct small-matrix sgemm, a size it multiplies without packing, for few columns of
        ``y``; elsewhere the whole run). Runs shorter than ``min_run`` rows on average (a layout of
        many small flushes) gather instead: a small product per run costs more than the copy.
        Equal to the gathered product within float32 rounding (BLAS blocks a product by its
        shape)."""
        idx = np.asarray(idx, dtype=np.int64)
        y = np.ascontiguousarray(y, dtype=np.float32)
        if idx.size == 0:
            return np.zeros((0, y.shape[0]), np.float32)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(which) != 0)) + 1
        if idx.size < min_run * (cut.size + 1):
            return self[idx] @ y.T
        out = np.empty((idx.size, y.shape[0]), np.float32)
        bounds = [0, *cut.tolist(), idx.size]
        step = max_piece or piece_rows(y.shape[0], y.shape[1]) or idx.size
        for a, b in zip(bounds[:-1], bounds[1:]):
            k = int(which[a])
            for off, run in self.pieces(k, int(idx[a] - self.starts[k]), b - a, step):
                np.matmul(run, y.T, out=out[a + off : a + off + run.shape[0]])
        return out

    def pieces(self, k: int, lo: int, n: int, step: int):
        """``(offset, rows as float32)`` of the ``n`` rows of chunk ``k`` from row ``lo``,
        ``step`` rows at a time: the products :meth:`matmul_rows` and :func:`_bucket_gains`
        make, cut the same way (so their values are the same bits)."""
        for s in range(0, n, step):
            run = self.chunks[k][lo + s : lo + min(n, s + step)]
            yield s, run if run.dtype == np.float32 else run.astype(np.float32)


_MAPPED_FS = pa_fs.LocalFileSystem(use_mmap=True)
_MAPPED_LOCK = threading.Lock()
_MAPPED_BYTES = [0]


def layout_dataset(lake: Lake, dt=None, file_pruning_predicate=None):
    """The ``pool_by_cluster`` pyarrow dataset (of the open snapshot ``dt``), memory-mapped on a
    local lake (:meth:`Lake.filesystem`): reading a bucket through the map skips the syscall's
    copy of its vectors into a buffer the Parquet decoder then copies again (a bucket's read
    ~25% faster here). Those reads do not show in ``/proc/self/io``; :func:`mapped_bytes`
    counts them."""
    return lake.dataset(LAYOUT_TABLE, dt, file_pruning_predicate, mmap=lake.is_local)


def mapped_bytes() -> int:
    """Bytes of ``pool_by_cluster`` columns this process has read through a memory map (the
    Arrow bytes of what the reads returned, before rows are picked): what ``rchar`` would have
    counted had they been syscalls."""
    return _MAPPED_BYTES[0]


def _count_mapped(ds, t: pa.Table) -> None:
    if _local_base(ds) is not None:
        _add_mapped(t.nbytes)


def _add_mapped(nbytes: int) -> None:
    with _MAPPED_LOCK:
        _MAPPED_BYTES[0] += nbytes


#: a bucket read spanning at least this many files views its uid, cluster and cos values in the
#: mapped pages; fewer files decode them through Arrow. Arrow costs ~0.4 ms a file (a Parquet
#: reader each) and releases the GIL; a view costs a page header parsed in Python (~25 us) per
#: column and row group, holding it. 32 buckets of a 1M layout, the three columns, one thread:
#: 3.5 files a bucket 86 ms through Arrow, 92 ms viewed; 8.5 files a bucket 149 vs 90 ms.
MAPPED_SMALL_MIN_FILES = 4
#: the small columns every bucket read returns, and the dtype each is held in (uid: its 16 bytes)
_SMALL_KINDS = {"uid": "uint8", "cluster_id": "int32", "cos_to_centroid": "float32"}


def read_bucket(lake: Lake, bucket: str, clusters=None, vectors: bool = True, dtype: str | None = None,
                dataset=None, chunked: bool = False) -> BucketRows:
    """Rows of one bucket from the lake, optionally only some clusters and without vectors.

    ``dataset``: an open ``pool_by_cluster`` pyarrow dataset to reuse (one per task);
    ``chunked``: ``x`` is a :class:`RowChunks` (rows gathered on indexing), not one array.

    Only the row groups whose ``cluster_id`` statistics admit a wanted cluster are read (rows
    lie sorted by cluster, see :func:`write_layout_rows`), and the wanted rows are picked from
    them here, not by a row filter of the scan: Arrow's filter copies every column it keeps (a
    second copy of the vectors, ~30% of a bucket's read), while the wanted rows of a row group
    are consecutive runs, so a chunked ``x`` holds views of them. A chunked read of a local lake
    views the vectors in the mapped files themselves (:func:`_mapped_columns`), with no
    decoding copy, and a read of a bucket in at least :data:`MAPPED_SMALL_MIN_FILES` files (an
    updated, not yet compacted bucket) its uid, cluster and cos values too (a layout written
    before the last two were stored PLAIN decodes those through Arrow); every other column,
    and every column elsewhere, goes through Arrow."""
    dtype = dtype or layout_dtype(lake)
    ds = dataset if dataset is not None else layout_dataset(lake)
    emb = emb_column(dtype)
    cols = ["uid", "cluster_id", "cos_to_centroid"] + ([emb] if vectors else [])
    frags, want = _fragments(ds, bucket, clusters)
    kinds = dict(_SMALL_KINDS) if len(frags) >= MAPPED_SMALL_MIN_FILES else {}
    if vectors and chunked:
        kinds[emb] = dtype
    mapped = _mapped_columns(ds, frags, kinds)
    t = _rows_of_fragments(ds, frags, [c for c in cols if c not in mapped])
    n_rows = sum(g.num_rows for f in frags for g in f.row_groups) if mapped else t.num_rows
    for c, views in mapped.items():
        if sum(v.shape[0] for v in views) != n_rows:
            raise ValueError(f"{LAYOUT_TABLE}: got {sum(v.shape[0] for v in views)} {c} values for {n_rows} rows of "
                             f"bucket {bucket}; expected one each")
    if t.num_columns and t.num_rows != n_rows:
        raise ValueError(f"{LAYOUT_TABLE}: got {t.num_rows} rows of bucket {bucket} for {n_rows} in its row groups")
    _count_mapped(ds, t)

    def small(c: str) -> np.ndarray:  # a small column, from its pages or from Arrow
        if c in mapped:
            return np.concatenate(mapped[c]) if mapped[c] else np.zeros((0, UID_BYTES) if c == "uid" else 0, _SMALL_KINDS[c])
        return binary_column_to_bytes(t.column(c)) if c == "uid" else t.column(c).to_numpy().astype(_SMALL_KINDS[c])

    cids = small("cluster_id")
    keep = None if want is None else np.isin(cids, want)
    uids, cos = small("uid"), small("cos_to_centroid")
    x = None
    if emb in mapped:
        x = RowChunks(_kept_runs(mapped[emb], keep))
    elif vectors:
        col = t.column(emb)
        if chunked:
            x = RowChunks(_kept_runs([_decode_chunk(c, dtype, stored=True) for c in col.chunks if len(c)], keep))
        else:
            x = decode_vectors(col, dtype)
            if keep is not None:
                x = x[keep]
    if keep is not None:
        uids, cids, cos = uids[keep], cids[keep], cos[keep]
    return BucketRows(uids=uids, cluster_ids=cids, cos=cos, x=x)


def _fragments(ds, bucket: str, clusters) -> tuple[list, np.ndarray | None]:
    """``(the bucket's files, as fragments holding only the row groups whose cluster_id
    statistics admit a wanted cluster, the wanted cluster ids (sorted int32))``; every row group
    and None when ``clusters`` is None. Read from the files' footers; no row is read."""
    frags = list(ds.get_fragments(filter=pc.field("bucket") == bucket))
    if clusters is None:
        return frags, None
    want = np.unique(np.asarray(list(clusters), dtype=np.int32))
    on_stats = pc.field("cluster_id").isin(pa.array(want))
    return [f for f in (f.subset(on_stats) for f in frags) if f.num_row_groups], want


def _dataset_of(ds, frags: list):
    """The fragments of ``ds`` as a dataset of their own."""
    return pads.FileSystemDataset(frags, ds.schema, ds.format, ds.filesystem)


def _rows_of_fragments(ds, frags: list, cols: list[str]) -> pa.Table:
    """``cols`` of the fragments' rows, fragment after fragment, each in row order. From a
    local lake each file's row groups are read by its own Parquet reader, with the footer the
    dataset already parsed: the dataset scanner's per-row-group overhead took 0.17 s where
    this takes 0.10 s (the uid, cluster and cos columns of a 1M layout, one thread)."""
    base = _local_base(ds)
    if base is None or not frags:
        return _dataset_of(ds, frags).to_table(columns=cols)
    import pyarrow.parquet as pq

    want = pa.schema([ds.schema.field(c) for c in cols])  # the types a scan of the dataset returns
    parts = []
    for f in frags:
        pf = pq.ParquetFile(os.path.join(base, f.path), metadata=f.metadata, memory_map=True)
        part = pf.read_row_groups([g.id for g in f.row_groups], columns=cols, use_threads=False)
        parts.append(part if part.schema.equals(want) else part.cast(want))
    return pa.concat_tables(parts)


def _local_base(ds) -> str | None:
    """The directory of a dataset read from a local memory-mapped lake (None otherwise)."""
    fs = ds.filesystem
    if isinstance(fs, pa_fs.SubTreeFileSystem) and fs.base_fs.equals(_MAPPED_FS):
        return fs.base_path
    return None


def _mapped_columns(ds, frags: list, columns: dict[str, str]) -> dict[str, list[np.ndarray]]:
    """``{column: views}``: the values of each of ``columns`` (``{name: dtype}``) in the
    fragments' row groups as views of their pages in the mapped files
    (:func:`curation.storage.parquet_pages.column_views`), in the order :func:`_rows_of_fragments`
    returns their rows; only the columns in that form in every fragment (the caller decodes
    the others through Arrow), and none when ``ds`` is not read from a local memory-mapped lake
    or there is no fragment. Counted in :func:`mapped_bytes` as the values' bytes.

    Measured (1M pool, a 10k shard touching every cluster, the 32 buckets' products on one
    thread): decoding the vector column through Arrow took 0.68 s of 2.36 s, a copy of every
    vector that the products then read again. The uid, cluster and cos columns through Arrow
    took ~0.2 s more (a Parquet reader per file; ~0.4 ms a file before a value is read)."""
    from curation.storage.parquet_pages import column_views

    base = _local_base(ds)
    if base is None or not frags:
        return {}
    out: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for f in frags:
        got = column_views(os.path.join(base, f.path), f.metadata, {c: columns[c] for c in out},
                           [g.id for g in f.row_groups])
        for c in list(out):
            if c in got:
                out[c].extend(got[c])
            else:
                del out[c]
        if not out:
            return {}
    _add_mapped(sum(v.shape[0] * v.strides[0] for views in out.values() for v in views))
    return out


def _kept_runs(chunks: list[np.ndarray], keep: np.ndarray | None) -> list[np.ndarray]:
    """The chunks' rows where ``keep`` (over the chunks' concatenated rows) is True, as views of
    their runs of consecutive kept rows, in order."""
    if keep is None:
        return chunks
    out, start = [], 0
    for c in chunks:
        k = keep[start : start + c.shape[0]]
        start += c.shape[0]
        if k.all():
            out.append(c)
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[False], k, [False]]).astype(np.int8)))
        out.extend(c[a:b] for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()))
    return out


def uid_sort_keys(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) uint8 uids -> (hi, lo) uint64 keys that sort like the hex strings."""
    u = np.ascontiguousarray(uids, dtype=np.uint8).view(">u8").reshape(-1, 2)
    return u[:, 0].astype(np.uint64), u[:, 1].astype(np.uint64)


def semdedup_order(cos: np.ndarray, uids: np.ndarray, cluster_ids: np.ndarray | None = None) -> np.ndarray:
    """Indices in SemDeDup order: cos_to_centroid ascending, ties by uid (the ``hard`` order);
    with ``cluster_ids``, grouped by cluster first (every cluster in that order)."""
    hi, lo = uid_sort_keys(uids)
    keys = (lo, hi, np.asarray(cos, dtype=np.float64))
    return lex_order(keys if cluster_ids is None else (*keys, np.asarray(cluster_ids)))


def _void(uids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(uids, dtype=np.uint8).view(f"V{UID_BYTES}").ravel()


def _match_old(u: np.ndarray, new_u: np.ndarray, old_u: np.ndarray, old_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For members ``u`` (n, 16): which are new, and the stored M of the others (by uid)."""
    v, vo = _void(u), _void(old_u)
    flag = np.isin(v, _void(new_u))
    order = np.argsort(vo, kind="stable")
    so = vo[order]
    m = np.full(len(u), -1.0, np.float32)
    rest = np.flatnonzero(~flag)
    pos = np.searchsorted(so, v[rest])
    pos = np.minimum(pos, max(0, so.size - 1))
    hit = so.size > 0
    if rest.size and (not hit or not np.array_equal(so[pos], v[rest])):
        raise ValueError(f"cluster update: got {rest.size} members that are neither new nor stored; expected every member in one of them")
    if rest.size:
        m[rest] = np.asarray(old_m, np.float32)[order[pos]]
    return flag, m


def piece_rows(width: int, d: int) -> int | None:
    """Rows per product of a run of ``d``-dimensional vectors by ``width`` new members (see
    :data:`MATMUL_PIECE_MNK`); None: the whole run in one product (always, where numpy's
    OpenBLAS has no direct small-matrix sgemm)."""
    if not native_blas.direct_sgemm():
        return None
    rows = MATMUL_PIECE_MNK // max(1, width * d)
    return rows if rows >= MATMUL_MIN_PIECE_ROWS else None


def _cluster_m(x_ord: np.ndarray, block: int) -> np.ndarray:
    return max_sim_to_earlier(x_ord, block=block)


def _update_m(x_ord, is_new: np.ndarray, old_m: np.ndarray, block: int, members: np.ndarray | None = None) -> np.ndarray:
    """Exact M after adding members: ``x_ord`` (n, d) in SemDeDup order, ``is_new`` (n,) bool,
    ``old_m`` (n,) float32 (ignored where new). One ``(new x n)`` product, in row blocks.

    A new member's M is its max cosine to every member before it (``-1`` when first); an old
    member's is ``max(old_m, max cos to the NEW members before it)``. With ``old_m = -inf``
    for the old members this returns only their gain (``-inf`` where no new member precedes
    them), which the caller combines with the stored M by uid.

    ``members``: ``x_ord`` is then a bucket's :class:`RowChunks` and ``members`` the cluster's
    row numbers in it, in SemDeDup order; the product runs over the rows where they lie
    (:meth:`RowChunks.matmul_rows`, no gather of the cluster) and the masks compare SemDeDup
    positions instead of row numbers (1M pool, a 10k shard touching every cluster: its 32
    buckets scored in 1.89-1.94 -> 1.75-1.80 s, medians of 5, two threads).
    """
    n = is_new.size
    out = np.where(is_new, np.float32(-np.inf), old_m).astype(np.float32)
    new_pos = np.flatnonzero(is_new)
    if new_pos.size == 0:
        return out
    if members is None:
        x = np.ascontiguousarray(x_ord, dtype=np.float32)
        pos = np.arange(n)  # the product's row r is the member at SemDeDup position r

        def products(p):
            return x @ np.ascontiguousarray(x[p]).T
    else:
        by_row = np.argsort(members, kind="stable")
        pos, rows = by_row, members[by_row]  # the product's row r: the member at position by_row[r]

        def products(p):
            return x_ord.matmul_rows(rows, x_ord[members[p]])
    ahead = np.arange(n)
    for s in range(0, new_pos.size, block):
        p = new_pos[s : s + block]  # ascending positions
        g = products(p)  # (n, b): row r = the member at position pos[r], col a = a new member
        # (b, n): row a = a new member, column q = the member at SemDeDup position q
        g_pos = np.empty((p.size, n), np.float32)
        g_pos[:, pos] = g.T
        # the new member's own M: max over every earlier member, the max of its row's first p
        # entries (one reduceat over the rows' [start, start + p) and [start + p, next row) spans)
        starts = np.arange(p.size) * n
        spans = np.maximum.reduceat(g_pos.reshape(-1), np.stack([starts, starts + p], axis=1).reshape(-1))
        out[p] = np.where(p > 0, spans[0::2], -np.inf)
        # every later OLD member gains the new members before it: a running max over the block's
        # new members, read at the last one before each position. A new member's own row (above)
        # already holds its cosine to every earlier member, new ones included; the same pair read
        # the other way (the earlier new member's row) is the same cosine rounded by another
        # product position, which packed BLAS kernels (Haswell's) round differently, so it is
        # not taken: a new member's M comes from its own row only, in every block split and in
        # _bucket_gains alike
        run = np.maximum.accumulate(g_pos, axis=0)
        before = np.searchsorted(p, ahead, side="left")  # new members of the block before each position
        at = np.flatnonzero((before > 0) & ~is_new)
        out[at] = np.maximum(out[at], run[before[at] - 1, at])
    out[is_new & np.isneginf(out)] = -1.0
    return out


def _bucket_gains(x: RowChunks, rows: np.ndarray, seg: np.ndarray, is_new: np.ndarray, budget_bytes: int,
                  block: int, piece: int | None = None, min_run: int = MATMUL_MIN_RUN) -> np.ndarray | None:
    """The gain mode of :func:`_update_m` for every cluster of a bucket at once: ``rows`` (R,)
    are the clusters' row numbers in ``x``, cluster after cluster (``seg``: their bounds, one
    more than the clusters), each in SemDeDup order; ``is_new`` (R,) marks the new members.

    Returns ``m`` (R,) float32: a new member's M (max cos to every member before it, ``-1``
    when first), an old member's gain (max cos to the new members before it, ``-inf`` when
    none). None when a cluster has more than ``block`` new members (:func:`_update_m` splits
    its products in blocks of that many) or the ``(R x most new members of one cluster)``
    products would not fit a quarter of ``budget_bytes``: the caller then scores cluster by
    cluster.

    The products are the same as :func:`_update_m`'s (each cluster's rows in row order, runs
    of consecutive rows cut into ``piece``-row products, default :func:`piece_rows` of the
    cluster's new members), so the values are too; only the masks change: one running max
    down the new members' rows and one ``reduceat`` over the bucket, instead of ~10 small
    numpy calls per cluster (1M pool, a 10k shard touching every cluster: the Python around
    the products held the GIL for ~0.4 s of the two threads' ~1 s).
    """
    n_cl = seg.size - 1
    r_total = rows.size
    cl = np.repeat(np.arange(n_cl), np.diff(seg))
    new_at = np.flatnonzero(is_new)
    per = np.bincount(cl[new_at], minlength=n_cl)  # new members per cluster
    width = int(per.max()) if per.size else 0
    if width == 0 or width > block or r_total * width * 4 > budget_bytes // 4:
        return None
    first_col = np.concatenate([[0], np.cumsum(per)])
    y = x[rows[new_at]]  # the new members' vectors, cluster after cluster, in SemDeDup order
    # the products in row order within each cluster: runs of consecutive rows of one chunk
    by_row = np.lexsort((rows, cl))
    r_sorted, c_sorted = rows[by_row], cl[by_row]
    which = np.searchsorted(x.starts, r_sorted, side="right") - 1
    cut = np.flatnonzero((np.diff(r_sorted) != 1) | (np.diff(which) != 0) | (np.diff(c_sorted) != 0)) + 1
    # column i: the member at by_row[i], row j: its sim to its cluster's j-th new member (rows
    # past a cluster's own new members are never read, and stay 0)
    g = np.zeros((width, r_total), np.float32)
    bounds = np.concatenate([[0], cut, [r_total]])
    # a cluster in runs shorter than ``min_run`` rows on average is gathered and multiplied
    # whole, as :meth:`RowChunks.matmul_rows` does (the same products, so the same values)
    runs_of = np.bincount(c_sorted[bounds[:-1]], minlength=n_cl)
    gathered = np.diff(seg) < min_run * runs_of
    done = -1
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        k, c = int(which[a]), int(c_sorted[a])
        yc = y[first_col[c] : first_col[c + 1]]
        if gathered[c]:
            if c != done:
                done = c
                g[: yc.shape[0], seg[c] : seg[c + 1]] = (x[r_sorted[seg[c] : seg[c + 1]]] @ yc.T).T
            continue
        step = piece or piece_rows(yc.shape[0], yc.shape[1]) or b - a
        for off, run in x.pieces(k, int(r_sorted[a] - x.starts[k]), b - a, step):
            g[: yc.shape[0], a + off : a + off + run.shape[0]] = (run @ yc.T).T
    inv = np.empty(r_total, np.int64)
    inv[by_row] = np.arange(r_total)
    g = np.take(g, inv, axis=1)  # column q: the member at SemDeDup position q
    # an old member's gain: the max of its column over the new members of its cluster before it
    # (rows in position order: a running max down the rows, read at the last one before it)
    before = np.cumsum(is_new) - is_new  # new members at earlier positions (of any cluster)
    before = before - before[seg[cl]]  # ... of its own cluster
    run_max = g.copy()  # row by row (numpy's accumulate down axis 0 took 3x as long)
    for j in range(1, width):
        np.maximum(run_max[j - 1], run_max[j], out=run_max[j])
    m = np.full(r_total, -np.inf, np.float32)
    at = np.flatnonzero(before)
    m[at] = run_max[before[at] - 1, at]
    del run_max
    # a new member's M: the max of its row over its cluster's positions before it
    row = np.arange(new_at.size) - first_col[cl[new_at]]
    lo_flat = row * r_total + seg[cl[new_at]]
    hi_flat = row * r_total + new_at
    ordr = np.argsort(lo_flat, kind="stable")  # spans in increasing start: the gaps between them read the array once
    spans = np.maximum.reduceat(g.reshape(-1), np.stack([lo_flat[ordr], hi_flat[ordr]], axis=1).reshape(-1))[0::2]
    own = np.empty(new_at.size, np.float32)
    own[ordr] = spans
    m[new_at] = np.where(new_at > seg[cl[new_at]], own, np.float32(-1.0))
    return m


def bucket_scores(
    item: tuple,
    root: str,
    storage_options: dict | None,
    dtype: str,
    d: int,
    block: int,
    memory_budget_bytes: int,
    manage_blas: bool = True,
    version: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup ``M`` for the touched clusters of ONE bucket, read by this task from the lake.

    Args:
        item: ``(bucket, full, adds)``: the bucket name, cluster ids to recompute in full
            (None: every cluster of the bucket) and ``{cluster_id: (new_uids (m, 16) uint8,
            old_uids (o, 16) uint8, old_m (o,) float32)}`` for clusters that only gained members;
            with ``old_uids = old_m = None`` (the GAIN mode) the old members' M is not known here:
            they get only their gain, max cos to the new members before them, and only the
            members with a gain (plus every new one) are returned. An optional fourth element,
            a :class:`_StoredScores` (in-process tasks only), narrows those to the members whose
            gain beats their stored M once the driver has published them.
        root, storage_options: the lake (each task opens it itself).
        dtype, d: the layout's vector dtype and dimension.
        block: similarity block rows; memory_budget_bytes: see :class:`LayoutConfig`.
        manage_blas: run the bucket's products on one BLAS thread (False: the caller already
            set the BLAS threads, e.g. a thread pool).
        version: the ``pool_by_cluster`` version to read (the driver's; None: the latest).
            A process opens each version once (:func:`_bucket_dataset`), not once per bucket.

    Returns:
        ``(uids (n, 16) uint8, cluster_ids (n,) int32, cos (n,) float32, m (n,) float32)`` for
        the members of the recomputed clusters (the gain for old members in the gain mode).
    """
    bucket, full, adds = item[:3]
    stored = item[3] if len(item) > 3 else None
    lake = Lake(root, storage_options or {})
    ds = _bucket_dataset(lake, bucket, version)
    wanted = None if full is None else sorted(set(full) | set(adds))
    # the bucket's row count from its files' footers (read_bucket reads them next anyway): a
    # count_rows with the bucket filter took ~2 ms a bucket
    n_rows = sum(f.metadata.num_rows for f in ds.get_fragments(filter=pc.field("bucket") == bucket))
    fits = n_rows * d * 4 <= memory_budget_bytes
    outs = []
    if fits:  # one read of the bucket (of its wanted clusters only: their row groups, see write_layout_rows)
        rows = read_bucket(lake, bucket, clusters=wanted, vectors=True, dtype=dtype, dataset=ds, chunked=True)
    else:
        rows = read_bucket(lake, bucket, clusters=wanted, vectors=False, dtype=dtype, dataset=ds)
    # one SemDeDup sort of the bucket, grouped by cluster (not one small sort per cluster)
    order = semdedup_order(rows.cos, rows.uids, rows.cluster_ids)
    c_sorted = rows.cluster_ids[order]
    cids = np.unique(c_sorted)
    if wanted is not None:
        cids = np.intersect1d(cids, np.asarray(wanted, dtype=cids.dtype))
    starts = np.searchsorted(c_sorted, cids, side="left")
    ends = np.searchsorted(c_sorted, cids, side="right")
    # the gain mode's new members, found for the whole bucket in one search of their keys
    gain = {c: g[0] for c, g in adds.items() if g[1] is None}
    is_new = None
    if gain:
        new_keys = np.sort(_keys(np.concatenate(list(gain.values()))))
        is_new = _find(new_keys, _keys(rows.uids[order]))[1]
    # one BLAS thread: many (few x n) products for add-only clusters, and SemDeDup's Gram with
    # the same bits on any number of cores (see max_sim_to_earlier)
    with single_thread_blas() if manage_blas else contextlib.nullcontext():
        if gain and len(gain) == len(adds) and fits and isinstance(rows.x, RowChunks) and cids.size:
            # the gain mode of a bucket read whole: every cluster's masks in one pass over the bucket
            span = np.concatenate([order[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
            seg = np.concatenate([[0], np.cumsum(ends - starts)])
            pos = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist())])
            m = _bucket_gains(rows.x, span, seg, is_new[pos], memory_budget_bytes, block)
            if m is not None:
                keep = np.flatnonzero(is_new[pos] | ~np.isneginf(m))
                ids = np.repeat(cids.astype(np.int32), np.diff(seg))
                at = span[keep]
                out = (rows.uids[at], ids[keep], rows.cos[at], m[keep])
                return _drop_unchanged(out, stored.get()) if stored is not None else out
        for c, a, b in zip(cids.tolist(), starts.tolist(), ends.tolist()):
            add = adds.get(c)
            if add is not None and add[1] is None:
                add = (is_new[a:b], None, None)
            outs.append(_score_cluster(lake, ds, bucket, rows, order[a:b], c, add, fits, dtype, d, block,
                                       memory_budget_bytes))
    if not outs:
        return np.zeros((0, UID_BYTES), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    out = tuple(np.concatenate([o[i] for o in outs]) for i in range(4))
    return _drop_unchanged(out, stored.get()) if stored is not None else out


def _score_cluster(lake, ds, bucket, rows, order, c, add, fits, dtype, d, block, memory_budget_bytes):
    """M of one cluster's members (``order``: its rows of ``rows`` in SemDeDup order): in full,
    the exact add-only update, or the gain of the old members (``add = (is_new, None, None)``,
    ``is_new`` (n,) bool along ``order``)."""
    u, cos = rows.uids[order], rows.cos[order]
    # an add-only cluster of a bucket read whole: its products run where its rows lie (no gather)
    members = order if fits and add is not None and isinstance(rows.x, RowChunks) else None
    if members is not None:
        x = rows.x
    elif fits:
        x = rows.x[order]
    elif len(order) * d * 4 <= memory_budget_bytes:
        one = read_bucket(lake, bucket, clusters=[c], vectors=True, dtype=dtype, dataset=ds)
        x = one.x[semdedup_order(one.cos, one.uids)]
    else:
        x = _spill_cluster(lake, ds, bucket, c, dtype, d)
    keep = None
    if add is not None:
        xm = x if members is not None else np.asarray(x)
        if add[1] is None:  # gain mode
            is_new = add[0]
            m = _update_m(xm, is_new, np.full(len(u), -np.inf, np.float32), block, members)
            keep = is_new | ~np.isneginf(m)
        else:
            new_u, old_u, old_m = add
            is_new, m_old = _match_old(u, new_u, old_u, old_m)
            m = _update_m(xm, is_new, m_old, block, members)
    elif isinstance(x, np.memmap):
        m = max_sim_to_earlier_blocked(x, block=block)
    else:
        m = _cluster_m(x, block)
    if isinstance(x, np.memmap):
        path = x.filename
        del x
        os.unlink(path)
    ids = np.full(len(u), c, np.int32)
    if keep is not None:
        return u[keep], ids[keep], cos[keep], m[keep]
    return u, ids, cos, m


def _spill_cluster(lake: Lake, ds, bucket: str, c: int, dtype: str, d: int) -> np.memmap:
    """A cluster above the memory budget, written in SemDeDup order to a temporary memmap,
    one record batch at a time (peak memory: one batch).

    ``ds``: the task's bucket dataset (the pass's table version). Like :func:`read_bucket`, only
    the row groups that may hold the cluster are read and its rows are picked by a mask: no
    row filter in the scan (which copies the vectors it keeps) and no listing of the table."""
    meta = read_bucket(lake, bucket, clusters=[c], vectors=False, dtype=dtype, dataset=ds)
    order = semdedup_order(meta.cos, meta.uids)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    fd, path = tempfile.mkstemp(prefix=f"semdedup_c{c}_", suffix=".f32")
    os.close(fd)
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(order.size, d))
    groups = _dataset_of(ds, _fragments(ds, bucket, [c])[0])
    row = 0
    for batch in groups.to_batches(columns=["cluster_id", emb_column(dtype)], batch_size=8192):
        _count_mapped(ds, batch)
        mine = batch.column(0).to_numpy() == c
        n = int(mine.sum())
        if n:
            x = _decode_chunk(batch.column(1), dtype, stored=True)
            mm[rank[row : row + n]] = x if n == batch.num_rows else x[mine]
            row += n
    if row != order.size:
        raise ValueError(f"{LAYOUT_TABLE}: got {row} vectors for cluster {c} of bucket {bucket}; expected {order.size} "
                         "(the table changed between two reads of one version?)")
    # no flush: only this process reads the file back, and deletes it after; the kernel writes
    # the dirty pages out when memory is short (what the spill is for). A flush (msync) forced
    # every page to disk first: ~10% of a spilled bucket's time.
    log.info("cluster %d (%d rows) above the memory budget: scored in blocks from %s", c, order.size, path)
    return mm


# --------------------------------------------------------------------------- SemDeDup over the layout


DEDUP_STATE_TABLE = "dedup_scores_shards"
_SCORE_SCHEMA = {"uid": pl.String, "cluster_id": pl.Int32, "cos_to_centroid": pl.Float32, "max_sim_to_earlier": pl.Float32}
_SCORE_ARROW = pa.schema([("uid", pa.large_string()), ("cluster_id", pa.int32()), ("cos_to_centroid", pa.float32()),
                          ("max_sim_to_earlier", pa.float32())])


@dataclass
class DedupUpdate:
    """Result of :func:`dedup_scores_by_bucket`.

    Attributes:
        table: the ``dedup_scores`` rows as Arrow (uid str, cluster_id i32, cos_to_centroid
            f32, max_sim_to_earlier f32), sorted by uid; :attr:`frame` is the same as polars.
        mode: ``"full"`` or ``"incremental"``.
        recomputed_clusters: clusters recomputed in full; updated_clusters: clusters that
            got the exact add-only update; rows_scored: members of both.
        reentered: rows whose uid was scored before but whose shard's content changed since
            (treated as removed + new: their old and new clusters are recomputed in full).
        shards: the layout's shard fingerprints and id the scores were computed from (written by
            :func:`write_dedup_scores` to ``dedup_scores_shards``, so the next update knows
            which shards are new or changed without joining the pool's uids).
        score_seconds: seconds spent scoring the buckets (reading and multiplying the touched
            clusters); the rest of the update is pool-wide (reading, merging the stored scores).
        touched_share: after changed or removed shards, the share of the stored rows in the
            clusters they touch, which chose between a full pass and the incremental path
            (``LayoutConfig.full_pass_fraction``); None when not measured.
    """

    table: pa.Table
    mode: str
    recomputed_clusters: int
    updated_clusters: int
    rows_scored: int
    reentered: int = 0
    shards: pl.DataFrame | None = None
    score_seconds: float = 0.0
    touched_share: float | None = None

    @property
    def frame(self) -> pl.DataFrame:
        """The rows as a polars frame (a conversion: the driver and the writer keep Arrow)."""
        return pl.from_arrow(self.table)

    @property
    def max_sim(self) -> np.ndarray:
        """(n,) float32 ``max_sim_to_earlier`` in uid order."""
        return self.table.column("max_sim_to_earlier").to_numpy()


def write_dedup_scores(lake: Lake, du: DedupUpdate) -> None:
    """Write ``dedup_scores`` and then, only after it, the shard state it was computed from
    (a crash in between leaves an OLDER state, which the next update treats conservatively:
    rows of shards it does not list count as new, or re-entered when already scored)."""
    lake.write("dedup_scores", du.table)
    release_memory()
    if du.shards is not None:
        cols = [c for c in ("shard", "fingerprint", "layout_id", "assignments_version") if c in du.shards.columns]
        lake.write(DEDUP_STATE_TABLE, du.shards.select(cols))


def scores_carry_assignments(lake: Lake) -> bool:
    """True when ``dedup_scores``' cluster_id and cos_to_centroid ARE the current
    ``assignments`` (so a recipe reads the one table, already sorted by uid, instead of reading
    and sorting ``assignments`` and aligning the scores to it: 1M rows, ~0.2 s).

    It holds when the scores' state names the current layout with the same shard fingerprints
    (:func:`_shard_diff` empty) AND the ``assignments`` version the scoring started from is
    still the table's version: nothing was written to ``assignments`` since (the layout writer
    writes ``assignments`` first and its shard state last, so a scoring that overlapped a
    layout update fails one of the two checks). A lake written before the version was
    recorded answers False (the reader then aligns the two tables, as before)."""
    if not (lake.exists("dedup_scores") and lake.exists(DEDUP_STATE_TABLE)):
        return False
    st = lake.read(DEDUP_STATE_TABLE)
    if "assignments_version" not in st.columns or st.height == 0 or st["assignments_version"].n_unique() != 1:
        return False
    state = layout_state(lake)  # None without a layout or assignments
    if state is None or int(st["assignments_version"][0]) != lake.table("assignments").version():
        return False
    diff = _shard_diff(lake, _layout_shards(state), stored=st)
    return diff is not None and not any(diff)


def _shard_diff(lake: Lake, layout_shards: pl.DataFrame | None,
                stored: pl.DataFrame | None = None) -> tuple[list[str], list[str], list[str]] | None:
    """``(new, changed, gone)`` shards of the layout against the state ``dedup_scores`` was
    computed from (``stored``: that table, when the caller has read it already); None when that
    state is unknown (a lake written before it existed) or was computed on another layout
    (rebuilt since: new centroids or settings)."""
    if layout_shards is None or (stored is None and not lake.exists(DEDUP_STATE_TABLE)):
        return None
    st = stored if stored is not None else lake.read(DEDUP_STATE_TABLE)
    if "layout_id" not in st.columns or set(st["layout_id"].to_list()) != set(layout_shards["layout_id"].to_list()):
        return None
    old = dict(zip(st["shard"].to_list(), st["fingerprint"].to_list()))
    now = dict(zip(layout_shards["shard"].to_list(), layout_shards["fingerprint"].to_list()))
    return (sorted(s for s in now if s not in old), sorted(s for s in now if s in old and old[s] != now[s]),
            sorted(s for s in old if s not in now))


def _keys(uids: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 uids -> (n,) ``S16`` keys that compare (and sort) like the hex strings."""
    return np.ascontiguousarray(uids, dtype=np.uint8).reshape(-1, UID_BYTES).view(f"S{UID_BYTES}").ravel()


class _KeyIndex:
    """Sorted ``S16`` uid keys, prepared once for many :meth:`find` calls: when one uint64 half
    of the keys is strictly increasing alone (a hash's high half, or a counter's low half) the
    searches compare that half only, and that check and its copy are made here, not per call
    (the add-only update's bucket tasks each search the pool's 1M stored keys)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self.half: int | None = None
        self.words: np.ndarray | None = None
        if keys.size == 0:
            return
        kw = keys.view(">u8").reshape(-1, 2)
        for half in (0, 1):
            k = kw[:, half].astype(np.uint64)  # native byte order: numpy's fast compare
            if (half == 0 or (kw[:, 0] == kw[0, 0]).all()) and bool(np.all(k[1:] > k[:-1])):
                self.half, self.words = half, k
                break

    def find(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the keys ``q`` in the keys and whether each was found."""
        if self.keys.size == 0:
            return np.zeros(q.size, np.int64), np.zeros(q.size, bool)
        qw = q.view(">u8").reshape(-1, 2)
        if self.half == 1 and not bool((qw[:, 0] == self.keys[:1].view(">u8")[0]).all()):
            k, qk = self.keys, q  # a counter's low half decides only among queries of the same high half
        elif self.half is not None:
            k, qk = self.words, qw[:, self.half].astype(np.uint64)
        else:  # general case: the 16-byte keys themselves
            k, qk = self.keys, q
        # queries in sorted order: each binary search starts where the last ended (1M queries
        # into 1M keys: 58 ms vs 334 ms in the queries' own, cache-hostile order)
        order = np.argsort(qk)
        pos = np.empty(q.size, np.int64)
        pos[order] = np.minimum(np.searchsorted(k, qk[order]), self.keys.size - 1)
        return pos, self.keys[pos] == q


def _find(keys: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the keys ``q`` in the sorted ``keys`` and whether each was found."""
    return _KeyIndex(keys).find(q)


class _StoredScores:
    """The stored ``dedup_scores`` (key index, M, cluster), published once by the add-only
    update's driver when it has read them. A bucket task of the same process that ends after
    the publication returns just the new members and the old ones whose gain beats their stored
    M (a 10k shard touching every cluster of a 1M pool: ~20k rows instead of ~950k, which the
    driver had to search for and merge); one that ends before it returns every gain, as other
    executors' tasks do, and the driver keeps the larger of the two. No task waits for it: at
    10M the read took 1.2-2.7 s, and tasks that waited for it sat idle that long."""

    def __init__(self):
        self._value = None

    def publish(self, index: _KeyIndex, m: np.ndarray, cl: np.ndarray) -> None:
        self._value = (index, m, cl)

    def get(self) -> tuple | None:
        return self._value


def _drop_unchanged(out: tuple, stored: tuple | None) -> tuple:
    """A gain-mode bucket result without the old members whose gain does not beat their stored
    M (``max(stored, gain)`` is then the stored M: the driver would change nothing). Rows not in
    the stored scores (the new members), and rows stored under another cluster (the driver
    rejects those), are all kept."""
    if stored is None or not out[0].shape[0]:
        return out
    index, m_old, cl_old = stored
    pos, hit = index.find(_keys(out[0]))
    keep = ~hit | (out[3] > m_old[pos]) | (out[1] != cl_old[pos])
    return tuple(a[keep] for a in out)


_SNAPSHOT: dict[tuple, object] = {}
_SNAPSHOT_LOCK = threading.Lock()


class _SnapshotFiles:
    """One ``pool_by_cluster`` snapshot's data files grouped by bucket, listed once (its add
    actions: ~0.3 ms), with the dataset schema, format and filesystem deltalake's
    ``to_pyarrow_dataset`` gives (its protocol checks ran once, on a dataset of no file)."""

    def __init__(self, lake: Lake, dt):
        self.paths = lake.partition_files(LAYOUT_TABLE, dt)
        empty = layout_dataset(lake, dt, [("bucket", "=", "")])  # no bucket is named "": no fragment
        self.schema, self.format, self.filesystem = empty.schema, empty.format, empty.filesystem

    def dataset(self, bucket: str):
        """The bucket's files as a dataset: each fragment with the partition expression
        ``bucket == <bucket>`` alone (row-group statistics, which the reads prune on, are in the
        footers)."""
        expr = pc.field("bucket") == bucket
        frags = [self.format.make_fragment(p, filesystem=self.filesystem, partition_expression=expr)
                 for p in self.paths.get(bucket, [])]
        return pads.FileSystemDataset(frags, self.schema, self.format, self.filesystem)


class _Snapshot:
    """One opened ``pool_by_cluster`` version: its DeltaTable, and on a local lake the listing of
    its files by bucket (:class:`_SnapshotFiles`), made on the first bucket dataset asked for."""

    def __init__(self, lake: Lake, dt):
        self.lake, self.dt = lake, dt
        self._files: _SnapshotFiles | None = None

    def files(self) -> "_SnapshotFiles | None":
        if not self.lake.is_local:  # elsewhere deltalake's object store reads the files
            return None
        with _SNAPSHOT_LOCK:
            if self._files is None:
                self._files = _SnapshotFiles(self.lake, self.dt)
        return self._files


def _snapshot(lake: Lake, version: int) -> _Snapshot:
    """The layout at ``version``, opened once per process (one snapshot held: the bucket threads
    of one run share it)."""
    key = (lake.uri(LAYOUT_TABLE), tuple(sorted(dict(lake.storage_options).items())), int(version))
    with _SNAPSHOT_LOCK:
        snap = _SNAPSHOT.get(key)
        if snap is None:
            from deltalake import DeltaTable

            dt = DeltaTable(lake.uri(LAYOUT_TABLE), version=int(version), storage_options=dict(lake.storage_options) or None)
            snap = _Snapshot(lake, dt)
            _SNAPSHOT.clear()  # one snapshot per process
            _SNAPSHOT[key] = snap
    return snap


def _layout_table(lake: Lake, version: int | None = None):
    """The ``pool_by_cluster`` DeltaTable; with ``version``, opened once per process and reused
    (a version never changes). Opening replays the table's log: at 10M rows the layout has
    ~24k files in ~80 commits, and one open per bucket task (313 buckets) cost more than the
    reads of small buckets."""
    if version is None:
        return lake.table(LAYOUT_TABLE)
    return _snapshot(lake, version).dt


def _bucket_dataset(lake: Lake, bucket: str | None, version: int | None = None):
    """The ``pool_by_cluster`` pyarrow dataset, of one bucket's files only when ``bucket`` is
    given (listing the whole table's files costs ~0.3 s at 1M rows). With ``version``, on a
    local lake, the bucket's files come from the snapshot's listing (:class:`_SnapshotFiles`):
    deltalake's own file pruning built every file's statistics into an expression on each
    call: a bucket's dataset and row count took ~6.5-7 ms of a 1M layout in ~13 files a bucket,
    against ~1.2-1.7 ms (footers read in both)."""
    if bucket is not None and version is not None:
        files = _snapshot(lake, version).files()
        if files is not None:
            return files.dataset(bucket)
    return layout_dataset(lake, _layout_table(lake, version), None if bucket is None else [("bucket", "=", bucket)])


def _score_items(lake: Lake, state: pl.DataFrame | None, clusters: set[int], full: set[int], adds: dict) -> list[tuple]:
    """One ``bucket_scores`` item per layout bucket that ``clusters`` fall in: ``(bucket, the
    bucket's clusters of full, {cluster: adds} of the bucket)``, sorted by bucket.

    A cluster's bucket is ``cluster_id // clusters_per_bucket``: nothing of the table is read
    but its partition list (reading its ``cluster_id`` and ``bucket`` columns to pair them took
    0.4 s at 1M rows; still done when the layout state is missing). A wanted cluster with no
    rows left (all removed) is named in its item if the bucket remains, and the task finds no
    rows of it; a bucket the layout no longer has gets no item. ``state``: :func:`layout_state`,
    as the caller read it."""
    present = set(lake.partitions(LAYOUT_TABLE))
    cs = np.array(sorted(set(clusters)), dtype=np.int64)
    if state is not None and state["clusters_per_bucket"].n_unique() == 1:
        names = bucket_names(cs, int(state["clusters_per_bucket"][0])).to_list()
    else:  # no layout state (a build killed before writing it): pair them from the rows
        pairs = pl.from_arrow(lake.dataset(LAYOUT_TABLE).to_table(columns=["cluster_id", "bucket"])).unique()
        of = dict(zip(pairs["cluster_id"].to_list(), pairs["bucket"].to_list()))
        names = [of.get(c) for c in cs.tolist()]
    by_bucket: dict[str, list[int]] = {}
    for c, b in zip(cs.tolist(), names):
        if b in present:
            by_bucket.setdefault(b, []).append(c)
    return [(b, sorted(set(cl) & full), {c: adds[c] for c in cl if c in adds}) for b, cl in sorted(by_bucket.items())]


def _timed_items(lake: Lake, executor: Executor, config: LayoutConfig, items: list[tuple]):
    """:func:`_run_items` and the seconds it took (the touched-cluster work of an update)."""
    t = time.perf_counter()
    out = _run_items(lake, executor, config, items)
    return out, time.perf_counter() - t


def _run_items(lake: Lake, executor: Executor, config: LayoutConfig, items: list[tuple]):
    """``bucket_scores`` over ``items``, every task reading the same table version. In process
    the buckets run on a pool of threads, one per core, each with one BLAS thread: one thread
    reads its bucket (Parquet decoding and disk waits release the GIL) while the other
    multiplies, instead of one bucket at a time whose read leaves the BLAS threads idle."""
    dtype = layout_dtype(lake)
    if not items:
        return (np.zeros((0, UID_BYTES), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    version = lake.table(LAYOUT_TABLE).version()
    kw = dict(root=lake.root, storage_options=dict(lake.storage_options) or None, dtype=dtype,
              d=_layout_dim(lake, dtype, items[0][0], version), block=config.block,
              memory_budget_bytes=config.memory_budget_bytes, version=version)
    workers = min(len(items), os.cpu_count() or 1)
    if executor.kind == "in-process" and workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        kw["memory_budget_bytes"] = max(1, config.memory_budget_bytes // workers)  # the budget holds for all threads

        with single_thread_blas(), ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda it: bucket_scores(it, **kw, manage_blas=False), items))
    else:
        results = executor.map(bucket_scores, items, **kw)
    parts = [r for r in results if r[0].shape[0]]
    if not parts:
        return (np.zeros((0, UID_BYTES), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    return tuple(np.concatenate([r[i] for r in parts]) for i in range(4))


def _add_only_update(lake: Lake, executor: Executor, config: LayoutConfig, new_shards: list[str],
                     layout_shards: pl.DataFrame) -> DedupUpdate | None:
    """The incremental update when shards were only ADDED since the stored scores.

    Reads the new rows (``assignments`` of the new shards), the stored ``dedup_scores`` and,
    per touched bucket, the touched clusters' vectors once; each task returns the new members'
    M and the old members' gain (max cos to the new members before them), so the driver only
    takes ``max(stored M, gain)`` by uid key: no N-scale string join, no uid conversion of the
    whole pool back to strings. None when the stored tables disagree with that premise (a uid
    of a new shard already scored, row counts that do not add up): the caller then takes the
    general path.
    """
    from concurrent.futures import ThreadPoolExecutor

    n_now = lake.count_rows("assignments")
    cols = ["uid", "cluster_id", "cos_to_centroid"]
    if new_shards:
        new = pl.from_arrow(rows_of_shards(lake, "assignments", new_shards, cols))
    else:
        new = pl.DataFrame(schema={c: _SCORE_SCHEMA[c] for c in cols})
    new = new.sort("uid").cast({k: v for k, v in _SCORE_SCHEMA.items() if k != "max_sim_to_earlier"})
    nb = uids_to_bytes(new["uid"])
    nkeys = _keys(nb)
    if new.height > 1 and not bool(np.all(nkeys[1:] > nkeys[:-1])):
        return None  # duplicate uids among the new rows
    adds = {c: (nb[g], None, None) for c, g in _groups(new["cluster_id"].to_numpy()).items()}
    items = []
    # in process, the tasks take the stored M from here once it is read (other executors' tasks
    # return every gain, and this driver keeps the larger of the two)
    stored = _StoredScores() if executor.kind == "in-process" else None
    if adds:
        cs = sorted(adds)
        by_bucket: dict[str, dict] = {}
        for c, b in zip(cs, bucket_names(np.array(cs), layout_clusters_per_bucket(lake)).to_list()):
            by_bucket.setdefault(b, {})[c] = adds[c]
        items = [(b, [], by_bucket[b], *([stored] if stored is not None else [])) for b in sorted(by_bucket)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the touched buckets are scored while the stored scores are read and checked (1M: the
        # read and its key decode, ~0.1 s, hide behind the scoring instead of preceding it)
        scored = pool.submit(_timed_items, lake, executor, config, items) if items else None
        # the stored scores through Arrow (no polars frame: 10M rows were ~1.5 GB of copies)
        old = lake.dataset("dedup_scores").to_table(columns=list(_SCORE_SCHEMA)).cast(_SCORE_ARROW)
        okeys = _keys(uids_to_bytes(old.column("uid")))
        if okeys.size > 1 and not bool(np.all(okeys[1:] > okeys[:-1])):  # written sorted by uid, normally
            oorder = np.argsort(okeys, kind="stable")
            old, okeys = old.take(oorder), okeys[oorder]
        oindex = _KeyIndex(okeys)
        # the premise fails (rows that do not add up, a new shard's uid scored before: re-entered
        # content): the general path, once the scoring started here has ended
        premise = old.num_rows + new.height == n_now and not (new.height and oindex.find(nkeys)[1].any())
        m_old = old.column("max_sim_to_earlier").to_numpy().astype(np.float32)
        ocl = old.column("cluster_id").to_numpy()
        if stored is not None and premise:
            stored.publish(oindex, m_old, ocl)
        if scored is not None and not premise:
            scored.exception()  # waits; an error there belongs to the path not taken
        result = scored.result() if scored is not None and premise else None
    if not premise:
        return None
    m = m_old  # the tasks have ended: the stored M (the driver's own copy) is updated in place
    m_new = np.full(new.height, np.nan, np.float32)
    score_s = 0.0
    if result is not None:
        (u, cid, _cos, val), score_s = result
        q = _keys(u)
        pos_n, is_n = _find(nkeys, q)
        pos_o, is_o = oindex.find(q[~is_n])
        if not is_o.all() or not np.array_equal(ocl[pos_o], cid[~is_n]):
            raise ValueError(f"{LAYOUT_TABLE}: got members that are neither new nor scored in their cluster; expected the "
                             "layout and dedup_scores to agree (re-materialize dedup_scores with incremental=False)")
        np.maximum.at(m, pos_o, val[~is_n])  # positions are unique; .at keeps it exact if not
        m_new[pos_n[is_n]] = val[is_n]
        if np.isnan(m_new).any():
            raise ValueError(f"{LAYOUT_TABLE}: got new rows missing from their buckets; expected every assigned row laid out")
    n_upd = int(np.isin(ocl, np.fromiter(adds, np.int32, len(adds))).sum()) + new.height
    table = old.set_column(old.schema.get_field_index("max_sim_to_earlier"), "max_sim_to_earlier", pa.array(m))
    if new.height:  # merge the sorted new rows in: each lands after the old keys below it
        fresh = new.with_columns(pl.Series("max_sim_to_earlier", m_new, dtype=pl.Float32)).to_arrow().cast(_SCORE_ARROW)
        at = np.searchsorted(okeys, nkeys) + np.arange(new.height)  # final rows of the new ones
        idx = np.empty(old.num_rows + new.height, np.int64)
        is_new_row = np.zeros(idx.size, bool)
        is_new_row[at] = True
        idx[is_new_row] = old.num_rows + np.arange(new.height)
        idx[~is_new_row] = np.arange(old.num_rows)
        table = pa.concat_tables([table, fresh]).take(idx)
    del old
    release_memory()
    return DedupUpdate(table, "incremental", 0, len(adds), n_upd, 0, layout_shards, score_s)


def dedup_scores_by_bucket(
    lake: Lake,
    executor: Executor | None = None,
    config: LayoutConfig = LayoutConfig(),
    incremental: bool = True,
) -> DedupUpdate:
    """SemDeDup ``M`` for the whole pool, one bucket per task, from the ``pool_by_cluster`` layout.

    With ``incremental`` and an existing ``dedup_scores`` table, only clusters whose members
    changed are scored (see the module docstring); the others keep their stored ``M``. A uid
    of a shard whose content changed since the stored scores (its embeddings files' fingerprint
    differs from ``dedup_scores_shards``) re-enters as new content: removed from its old
    cluster and added to its new one, both recomputed in full, even when its cluster and
    cos_to_centroid happen to be unchanged.

    Returns:
        A :class:`DedupUpdate` (the caller writes it with :func:`write_dedup_scores`).
    """
    executor = executor or InProcessExecutor()
    state = layout_state(lake)
    layout_shards = None
    if state is not None:
        # the assignments version the scores start from (read before any of them: a write to
        # assignments after this point makes the stored version stale, never the reverse)
        layout_shards = _layout_shards(state, lake.table("assignments").version())
    have_old = incremental and lake.exists("dedup_scores") and "cos_to_centroid" in _columns(lake, "dedup_scores")
    stored = lake.read(DEDUP_STATE_TABLE) if have_old and lake.exists(DEDUP_STATE_TABLE) else None
    diff = _shard_diff(lake, layout_shards, stored=stored) if stored is not None else None
    if diff is not None and not diff[1] and not diff[2]:  # shards only added: the add-only update
        du = _add_only_update(lake, executor, config, diff[0], layout_shards)
        if du is not None:
            return du
    share = None
    if diff is not None and (diff[1] or diff[2]) and float(config.full_pass_fraction) <= 1.0:
        share = _touched_share(lake, stored, *diff)
        if share >= float(config.full_pass_fraction):  # a full pass costs less than the join below
            log.info("SemDeDup update: the changed or removed shards touch clusters holding %.1f%% of the scored rows "
                     "(full_pass_fraction %.2f): every bucket is recomputed", 100 * share, config.full_pass_fraction)
            have_old = False
    if not have_old:  # every bucket in full: no N-scale table is read by the driver
        n_asg = lake.count_rows("assignments")
        items = [(b, None, {}) for b in lake.partitions(LAYOUT_TABLE)]
        (u, cid, cos, m), score_s = _timed_items(lake, executor, config, items)
        table = _scores_table(u, cid, cos, m)
        if table.num_rows != n_asg:
            raise ValueError(f"dedup_scores: got {table.num_rows} scores for {n_asg} assigned rows; expected one each "
                             "(the layout and assignments disagree: re-run concept_clusters with mode 'retrain')")
        return DedupUpdate(table, "full", int(np.unique(cid).size), 0, table.num_rows, 0, layout_shards, score_s, share)
    asg = lake.read("assignments", columns=["uid", "shard", "cluster_id", "cos_to_centroid"])
    full_clusters: set[int] | None = None
    adds: dict[int, tuple] = {}
    keep = None
    mode = "full"
    reentered = 0
    if have_old:
        old = lake.read("dedup_scores", columns=list(_SCORE_SCHEMA))
        mode = "incremental"
        j = asg.join(old.rename({"cluster_id": "c_old", "cos_to_centroid": "s_old"}), on="uid", how="full", coalesce=True)
        moved = pl.col("c_old").is_not_null() & ((pl.col("c_old") != pl.col("cluster_id"))
                                                 | (pl.col("s_old") != pl.col("cos_to_centroid")))
        # without the state every shard may have changed: only a moved row is known to have
        fresh_sh = None if diff is None else diff[0] + diff[1]
        if fresh_sh:  # rows of new or changed shards that were scored before: removed + new
            again = pl.col("c_old").is_not_null() & pl.col("cluster_id").is_not_null() & pl.col("shard").is_in(fresh_sh)
            reentered = int(j.select(again.sum()).item())
            moved = moved | again
        gone_or_moved = j.filter(pl.col("cluster_id").is_null() | moved)
        full_clusters = set(gone_or_moved["c_old"].drop_nulls().to_list()) | set(gone_or_moved["cluster_id"].drop_nulls().to_list())
        new_rows = j.filter(pl.col("c_old").is_null() & pl.col("cluster_id").is_not_null())
        add_clusters = set(new_rows["cluster_id"].to_list()) - full_clusters
        touched = full_clusters | add_clusters
        keep = old.filter(~pl.col("cluster_id").is_in(list(touched))).filter(pl.col("uid").is_in(asg["uid"].implode()))
        if add_clusters:
            nr = new_rows.filter(pl.col("cluster_id").is_in(list(add_clusters)))
            orows = old.filter(pl.col("cluster_id").is_in(list(add_clusters)))
            nb = uids_to_bytes(nr["uid"])
            ob = uids_to_bytes(orows["uid"])
            om = orows["max_sim_to_earlier"].to_numpy().astype(np.float32)
            new_groups = _groups(nr["cluster_id"].to_numpy())
            old_groups = _groups(orows["cluster_id"].to_numpy())
            empty = np.zeros(0, np.int64)
            for c in add_clusters:
                gi, go = new_groups.get(c, empty), old_groups.get(c, empty)
                adds[c] = (nb[gi], ob[go], om[go])
    items = _score_items(lake, state, full_clusters | set(adds), full_clusters, adds)
    (u, cid, cos, m), score_s = _timed_items(lake, executor, config, items)
    fresh = pl.from_arrow(_scores_table(u, cid, cos, m))
    frame = pl.concat([keep.select(fresh.columns).cast(fresh.schema), fresh]).sort("uid") if keep is not None else fresh
    if frame.height != asg.height:
        raise ValueError(f"dedup_scores: got {frame.height} scores for {asg.height} assigned rows; expected one each "
                         "(the layout and assignments disagree: re-run concept_clusters with mode 'retrain')")
    n_full = len(full_clusters) if full_clusters is not None else int(np.unique(cid).size)
    return DedupUpdate(frame.to_arrow().cast(_SCORE_ARROW), mode, n_full, len(adds), int(fresh.height), reentered,
                       layout_shards, score_s, share)


def _touched_share(lake: Lake, st: pl.DataFrame, new: list[str], changed: list[str], gone: list[str]) -> float:
    """The share of the stored ``dedup_scores`` rows that lie in clusters an update of these
    shards touches: the clusters of the new and changed shards' rows in ``assignments`` now,
    and of the changed and gone shards' rows at the ``assignments`` version the scores were
    computed from (``st``: the ``dedup_scores_shards`` rows, as the caller read them; that
    version's files outlive the update's rewrite until a vacuum). When that version can no longer be read (vacuumed, or a state written before
    versions were stored), the new rows' clusters alone: a lower bound, so the caller keeps
    the incremental path when unsure. Reads a few files and one int32 column."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    stored = lake.dataset("dedup_scores").to_table(columns=["cluster_id"]).column(0).to_numpy()
    if stored.size == 0:
        return 0.0
    parts = []
    if new or changed:
        parts.append(rows_of_shards(lake, "assignments", new + changed, ["cluster_id"]).column(0).to_numpy())
    if (changed or gone) and "assignments_version" in st.columns and st["assignments_version"].n_unique() == 1 \
            and st["assignments_version"].null_count() == 0:
        try:
            dt = DeltaTable(lake.uri("assignments"), version=int(st["assignments_version"][0]),
                            storage_options=dict(lake.storage_options) or None)
            parts.append(rows_of_shards(lake, "assignments", changed + gone, ["cluster_id"], dt=dt).column(0).to_numpy())
        except (OSError, DeltaError, pa.ArrowException) as e:
            log.info("SemDeDup update: the removed rows' clusters are unknown (%s): counting the new rows' only", e)
    if not parts:
        return 0.0
    return float(np.isin(stored, np.unique(np.concatenate(parts))).mean())


def _scores_table(u: np.ndarray, cid: np.ndarray, cos: np.ndarray, m: np.ndarray) -> pa.Table:
    """The ``dedup_scores`` rows of compact uids, sorted by uid: the order comes from the two
    uint64 halves of the uid bytes (they sort like the hex strings), and the hex strings are
    made once, in that order, as one Arrow column (no ``<U32`` array, no string sort)."""
    hi, lo = uid_sort_keys(u)
    order = lex_order((lo, hi))
    del hi, lo
    return pa.table({
        "uid": uid_arrow(bytes_to_hex(u[order])),
        "cluster_id": pa.array(np.asarray(cid[order], np.int32)),
        "cos_to_centroid": pa.array(np.asarray(cos[order], np.float32)),
        "max_sim_to_earlier": pa.array(np.asarray(m[order], np.float32)),
    }, schema=_SCORE_ARROW)


def _columns(lake: Lake, table: str) -> list[str]:
    return [f.name for f in pa.schema(lake.table(table).schema().to_arrow())]


def _groups(ids: np.ndarray) -> dict[int, np.ndarray]:
    """``{id: row indices}`` in one sort (not one pass over the rows per id)."""
    order = np.argsort(ids, kind="stable")
    u, starts = np.unique(ids[order], return_index=True)
    return {int(c): g for c, g in zip(u.tolist(), np.split(order, starts[1:]))}


def _layout_dim(lake: Lake, dtype: str, bucket: str | None = None, version: int | None = None) -> int:
    """Vector dimension of the layout, from the first row of one data file (of ``bucket``)."""
    ds = _bucket_dataset(lake, bucket, version)
    for frag in ds.get_fragments():
        head = frag.head(1, columns=[emb_column(dtype)])
        if head.num_rows:
            return decode_vectors(head.column(0), dtype).shape[1]
    return 0


# --------------------------------------------------------------------------- CLIP recipes over the layout


def layout_has_text(lake: Lake) -> bool:
    """True when ``pool_by_cluster`` carries caption vectors (written with ``with_text``)."""
    if not lake.exists(LAYOUT_TABLE):
        return False
    names = [f.name for f in pa.schema(lake.table(LAYOUT_TABLE).schema().to_arrow())]
    return any(text_column(dt) in names for dt in DTYPES)


def _read_pairs(ds, bucket: str, dtype: str):
    t = ds.to_table(columns=["uid", emb_column(dtype), text_column(dtype)], filter=pc.field("bucket") == bucket)
    _count_mapped(ds, t)
    return (binary_column_to_bytes(t.column("uid")), decode_vectors(t.column(emb_column(dtype)), dtype),
            decode_vectors(t.column(text_column(dtype)), dtype))


def _rows_of(bucket_uids: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row of each wanted uid (n, 16) in the bucket's uids."""
    v, w = _void(bucket_uids), _void(want)
    order = np.argsort(v, kind="stable")
    pos = np.searchsorted(v[order], w)
    pos = np.minimum(pos, max(0, v.size - 1))
    if w.size and (v.size == 0 or not np.array_equal(v[order][pos], w)):
        raise ValueError(f"{LAYOUT_TABLE}: got uids missing from their bucket; expected the layout to cover the pool "
                         "(re-materialize concept_clusters)")
    return order[pos]


def bucket_clipcov(item: tuple, root: str, storage_options: dict | None, dtype: str, max_dense: int, large: str,
                   factorized: bool, version: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy CLIPCov for the classes of ONE bucket, read by this task from the lake (at the
    table ``version`` the driver pinned; None: the latest).

    ``item = (bucket, [(member_uids (m, 16) uint8 in visiting order, budget), ...])``; returns
    one ``(picks, gains)`` per class (:func:`curation.select.clipcov.clipcov_greedy`)."""
    from curation.select.clipcov import clipcov_greedy

    bucket, classes = item
    ds = _bucket_dataset(Lake(root, storage_options or {}), bucket, version)
    u, img, txt = _read_pairs(ds, bucket, dtype)
    out = []
    for members, b in classes:
        r = _rows_of(u, members)
        out.append(clipcov_greedy(img[r], txt[r], b, max_dense=max_dense, large=large, factorized=factorized))
    return out


def bucket_clip_scores(bucket: str, root: str, storage_options: dict | None, dtype: str,
                       version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uids (n, 16) uint8, cos(image, caption) (n,) float32)`` of one bucket (at ``version``)."""
    from curation.select.clipcov import clip_scores

    ds = _bucket_dataset(Lake(root, storage_options or {}), bucket, version)
    u, img, txt = _read_pairs(ds, bucket, dtype)
    return u, clip_scores(img, txt)


@dataclass(frozen=True)
class LayoutRef:
    """Where a recipe reads aligned vectors bucket by bucket: the lake root, options, dtype,
    ``clusters_per_bucket`` and table ``version`` of the ``pool_by_cluster`` layout (picklable,
    for Ray tasks). Every bucket task reads that one version (a layout written meanwhile, by a
    concurrent ``concept_clusters`` run, changes nothing a recipe reads), each opening only its
    bucket's files from one snapshot per process (not the whole table's, once per task)."""

    root: str
    storage_options: dict
    dtype: str
    clusters_per_bucket: int
    version: int | None = None

    @classmethod
    def of(cls, lake: Lake) -> LayoutRef:
        dt = lake.table(LAYOUT_TABLE)
        return cls(lake.root, dict(lake.storage_options), layout_dtype(lake, dt), layout_clusters_per_bucket(lake),
                   dt.version())

    def clip_scores(self, uids, executor: Executor | None = None) -> np.ndarray:
        """(n,) float32 CLIP score of every pool uid (str), one bucket per task."""
        executor = executor or InProcessExecutor()
        lake = Lake(self.root, self.storage_options)
        buckets = lake.partitions(LAYOUT_TABLE, None if self.version is None else _layout_table(lake, self.version))
        res = executor.map(bucket_clip_scores, buckets, root=self.root,
                           storage_options=self.storage_options or None, dtype=self.dtype, version=self.version)
        u = np.concatenate([r[0] for r in res]) if res else np.zeros((0, UID_BYTES), np.uint8)
        sc = np.concatenate([r[1] for r in res]) if res else np.zeros(0, np.float32)
        return sc[_rows_of(u, uids_to_bytes(uids))]

    def clipcov(self, uids, class_ids: np.ndarray, n_keep: int, max_dense: int, large: str, factorized: bool,
                executor: Executor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`curation.select.clipcov.clipcov_select` (classes = clusters) with each bucket's
        classes run by one task that reads its bucket: the same budgets, member order and greedy,
        so the same result. Returns ``(kept, pos, gain)`` indexing ``uids``."""
        from curation.select.budgets import ssp_budgets

        executor = executor or InProcessExecutor()
        class_ids = np.asarray(class_ids, dtype=np.int64)
        ub = uids_to_bytes(uids)
        hi, lo = uid_sort_keys(ub)
        order = np.lexsort((lo, hi, class_ids)).astype(np.int64)  # by class, then uid
        classes, starts, counts = np.unique(class_ids[order], return_index=True, return_counts=True)
        budgets = ssp_budgets(counts, n_keep)
        by_bucket: dict[int, list] = {}
        for c, s, cnt, b in zip(classes.tolist(), starts.tolist(), counts.tolist(), budgets.tolist()):
            if b > 0:
                by_bucket.setdefault(c // self.clusters_per_bucket, []).append((order[s : s + cnt], int(b)))
        names = bucket_names(np.array(sorted(by_bucket), dtype=np.int64) * self.clusters_per_bucket,
                             self.clusters_per_bucket).to_list()
        items = [(name, [(ub[m], b) for m, b in by_bucket[bk]]) for name, bk in zip(names, sorted(by_bucket))]
        res = executor.map(bucket_clipcov, items, root=self.root, storage_options=self.storage_options or None,
                           dtype=self.dtype, max_dense=max_dense, large=large, factorized=factorized,
                           version=self.version)
        kept, pos, gain = [], [], []
        for bk, r in zip(sorted(by_bucket), res):
            for (members, b), (p, g) in zip(by_bucket[bk], r):
                kept.append(members[p])
                pos.append(np.arange(b, dtype=np.int64))
                gain.append(g)
        if not kept:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
        return np.concatenate(kept), np.concatenate(pos), np.concatenate(gain)


def iter_layout(lake: Lake, dtype: str | None = None):
    """Yield ``(bucket, BucketRows)`` for every bucket of the layout, one at a time."""
    dtype = dtype or layout_dtype(lake)
    for b in lake.partitions(LAYOUT_TABLE):
        yield b, read_bucket(lake, b, dtype=dtype)


__all__ = [
    "BucketRows",
    "DEDUP_STATE_TABLE",
    "DedupUpdate",
    "LayoutConfig",
    "LayoutUpdate",
    "bucket_scores",
    "build_layout",
    "dedup_scores_by_bucket",
    "fit_centroids",
    "iter_layout",
    "layout_dataset",
    "mapped_bytes",
    "read_bucket",
    "scores_carry_assignments",
    "semdedup_order",
    "training_sample",
    "update_layout",
    "write_dedup_scores",
]
