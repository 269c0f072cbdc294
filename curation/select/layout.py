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
   (one ``(new x members)`` product), clusters that lost members are recomputed. Budgets
   and selections are then recomputed from the stored scores. The result is identical to a
   full recompute (tests/test_layout_pool.py).

Peak memory of every step is bounded by the largest bucket (or the budget) + centroids +
one partition, never by N.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curation.embed.pool_reader import iter_pool_partitions, partition_fingerprints
from curation.engine.executor import Executor, InProcessExecutor
from curation.ingest.ids import (
    UID_BYTES,
    binary_column_to_bytes,
    binary_uid_column,
    bytes_to_uids,
    uids_to_bytes,
)
from curation.select.clustering import (
    DEFAULT_MAX_POINTS_PER_CENTROID,
    DEFAULT_NITER,
    assign_any,
    train_centroids_any,
)
from curation.select.similarity import (
    DEFAULT_BLOCK,
    max_sim_to_earlier,
    max_sim_to_earlier_blocked,
)
from curation.storage.lake import Lake

log = logging.getLogger(__name__)

LAYOUT_TABLE = "pool_by_cluster"
SHARDS_TABLE = "pool_by_cluster_shards"
DTYPES = ("float32", "float16")
DEFAULT_CLUSTERS_PER_BUCKET = 32
DEFAULT_FLUSH_ROWS = 131_072
DEFAULT_MEMORY_BUDGET = 1 << 30


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
    """

    clusters_per_bucket: int = DEFAULT_CLUSTERS_PER_BUCKET
    dtype: str = "float32"
    flush_rows: int = DEFAULT_FLUSH_ROWS
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
    block: int = DEFAULT_BLOCK
    with_text: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: got {self.dtype!r}; expected one of {DTYPES}")
        for name in ("clusters_per_bucket", "flush_rows", "memory_budget_bytes", "block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}; expected >= 1")


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
    """Inverse of :func:`encode_vectors`: -> contiguous ``(n, d) float32``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    if col.type != pa.large_binary():
        col = col.cast(pa.large_binary())
    off = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + n + 1]
    width = int(off[1] - off[0])
    if not np.all(np.diff(off) == width):
        raise ValueError("vector column: got rows of different byte lengths; expected one width")
    item = np.dtype(dtype).itemsize
    raw = np.frombuffer(col.buffers()[2], dtype=np.dtype(dtype).newbyteorder("<"))[off[0] // item : off[-1] // item]
    return np.ascontiguousarray(raw.reshape(n, width // item), dtype=np.float32)


# --------------------------------------------------------------------------- k-means on a sample


def training_sample(lake: Lake, n_max: int, seed: int = 0, table: str = "embeddings") -> tuple[np.ndarray, int]:
    """A seeded uniform sample of at most ``n_max`` rows of the pool, read partition by partition.

    Returns:
        ``(sample, n_total)``: (m, d) float32 rows (in pool order) and the pool size.
    """
    ds = lake.table(table).to_pyarrow_dataset()
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


def fit_centroids(
    lake: Lake,
    k: int,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID,
    method: str = "auto",
    gpu: bool | None = None,
) -> tuple[np.ndarray, int]:
    """Spherical k-means trained on a bounded sample (``max_points_per_centroid * k`` rows).

    Returns:
        ``(centroids, n_total)``: (k, d) float32 unit-norm centroids and the pool size.
    """
    sample, total = training_sample(lake, max_points_per_centroid * k, seed)
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
    """

    mode: str
    n_rows: int
    n_new: int
    added_shards: list[str]
    removed_shards: list[str]
    touched_clusters: np.ndarray
    encoders: list[str] = field(default_factory=list)
    rows_written: int = 0


class _Writer:
    """Buffers per-partition rows and appends them to ``assignments`` and ``pool_by_cluster``."""

    def __init__(self, lake: Lake, config: LayoutConfig, overwrite: bool):
        self.lake, self.config, self.first = lake, config, overwrite
        self.asg: list[pa.Table] = []
        self.vec: list[pa.Table] = []
        self.rows = 0
        self.written = 0

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
        vec = pa.concat_tables(self.vec) if self.vec else None
        if asg is not None:
            self.lake.write("assignments", asg, mode=mode)
            write_layout_rows(self.lake, vec, mode)
            self.written += vec.num_rows
            self.first = False
        self.asg, self.vec, self.rows = [], [], 0


def write_layout_rows(lake: Lake, rows: pa.Table, mode: str) -> None:
    """Append (or overwrite with) ``pool_by_cluster`` rows, partitioned by bucket.

    Parquet pages are written UNCOMPRESSED: the vector bytes do not compress (snappy saves
    < 1% on float32 embeddings) and reading a bucket is then ~3-8x faster (measured in
    docs/benchmarks.md).
    """
    from deltalake import WriterProperties, write_deltalake

    if lake.is_local:
        os.makedirs(lake.root, exist_ok=True)
    kwargs = {"schema_mode": "overwrite"} if mode == "overwrite" else {}
    write_deltalake(lake.uri(LAYOUT_TABLE), rows, mode=mode, partition_by=["bucket"],
                    storage_options=dict(lake.storage_options) or None,
                    writer_properties=WriterProperties(compression="UNCOMPRESSED"), **kwargs)


def _stream_assign(lake: Lake, centroids: np.ndarray, config: LayoutConfig, shards, writer: _Writer,
                   assign_method: str, gpu) -> tuple[int, set[int], set[str]]:
    n = 0
    touched: set[int] = set()
    encoders: set[str] = set()
    cols = ("image", "text") if config.with_text else ("image",)
    for shard, uids, mats, enc in iter_pool_partitions(lake, shards=shards, columns=cols):
        encoders |= enc
        if len(encoders) > 1:
            raise ValueError(f"embeddings from different encoders: {sorted(encoders)}; re-embed the shards with one encoder")
        x = mats["image"]
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(f"shard {shard!r}: got {x.shape[1]}-dim embeddings; expected {centroids.shape[1]} (the centroids')")
        ids, cos = assign_any(x, centroids, method=assign_method, gpu=gpu)
        touched |= set(np.unique(ids).tolist())
        writer.add(shard, uids, x, ids, cos, mats.get("text"))
        n += len(uids)
    writer.flush()
    return n, touched, encoders


def _write_shard_state(lake: Lake, fps: dict[str, str], config: LayoutConfig) -> None:
    lake.write(SHARDS_TABLE, pl.DataFrame({
        "shard": pl.Series(sorted(fps), dtype=pl.String),
        "fingerprint": pl.Series([fps[s] for s in sorted(fps)], dtype=pl.String),
        "clusters_per_bucket": pl.Series([config.clusters_per_bucket] * len(fps), dtype=pl.Int32),
        "dtype": pl.Series([config.dtype] * len(fps), dtype=pl.String),
        "with_text": pl.Series([config.with_text] * len(fps), dtype=pl.Boolean),
    }))


def build_layout(lake: Lake, centroids: np.ndarray, config: LayoutConfig = LayoutConfig(),
                 assign_method: str = "auto", gpu: bool | None = None) -> LayoutUpdate:
    """Assign every row (streaming) and write ``assignments`` + ``pool_by_cluster`` from scratch."""
    fps = partition_fingerprints(lake)
    writer = _Writer(lake, config, overwrite=True)
    n, _touched, enc = _stream_assign(lake, centroids, config, None, writer, assign_method, gpu)
    if n == 0:
        raise ValueError("embeddings table: got no rows; expected embedded samples (materialize embeddings first)")
    _write_shard_state(lake, fps, config)
    return LayoutUpdate("rebuild", n, n, sorted(fps), [], np.arange(centroids.shape[0], dtype=np.int32),
                        sorted(enc), writer.written)


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
        rm = lake.table("assignments").to_pyarrow_table(columns=["cluster_id"], filters=[("shard", "in", removed)])
        touched |= set(pc.unique(rm.column("cluster_id")).to_pylist())
        pred = _in_list("shard", removed)
        lake.table("assignments").delete(pred)
        lake.table(LAYOUT_TABLE).delete(pred)
    writer = _Writer(lake, config, overwrite=False)
    n_new, t_new, enc = _stream_assign(lake, centroids, config, new + changed, writer, assign_method, gpu) if (new or changed) else (0, set(), set())
    touched |= t_new
    _write_shard_state(lake, fps, config)
    n_rows = lake.table("assignments").to_pyarrow_dataset().count_rows()
    log.info("layout update: %d new rows from %d shards, %d shards removed, %d clusters touched",
             n_new, len(new) + len(changed), len(removed), len(touched))
    return LayoutUpdate("incremental", n_rows, n_new, new + changed, removed,
                        np.array(sorted(touched), dtype=np.int32), sorted(enc), writer.written)


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


def layout_dtype(lake: Lake) -> str:
    """The vector dtype of the ``pool_by_cluster`` table (from its column name)."""
    names = lake.table(LAYOUT_TABLE).schema().to_arrow()
    names = [f.name for f in pa.schema(names)]
    for dt in DTYPES:
        if emb_column(dt) in names:
            return dt
    raise ValueError(f"{LAYOUT_TABLE}: got columns {names}; expected one of {[emb_column(d) for d in DTYPES]}")


def read_bucket(lake: Lake, bucket: str, clusters=None, vectors: bool = True, dtype: str | None = None,
                dataset=None) -> BucketRows:
    """Rows of one bucket from the lake, optionally only some clusters and without vectors.

    ``dataset``: an open ``pool_by_cluster`` pyarrow dataset to reuse (one per task)."""
    dtype = dtype or layout_dtype(lake)
    ds = dataset if dataset is not None else lake.table(LAYOUT_TABLE).to_pyarrow_dataset()
    flt = pc.field("bucket") == bucket
    if clusters is not None:
        flt = flt & pc.field("cluster_id").isin(pa.array(np.asarray(list(clusters), dtype=np.int32)))
    cols = ["uid", "cluster_id", "cos_to_centroid"] + ([emb_column(dtype)] if vectors else [])
    t = ds.to_table(columns=cols, filter=flt)
    return BucketRows(
        uids=binary_column_to_bytes(t.column("uid")),
        cluster_ids=t.column("cluster_id").to_numpy().astype(np.int32),
        cos=t.column("cos_to_centroid").to_numpy().astype(np.float32),
        x=decode_vectors(t.column(emb_column(dtype)), dtype) if vectors else None,
    )


def uid_sort_keys(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) uint8 uids -> (hi, lo) uint64 keys that sort like the hex strings."""
    u = np.ascontiguousarray(uids, dtype=np.uint8).view(">u8").reshape(-1, 2)
    return u[:, 0].astype(np.uint64), u[:, 1].astype(np.uint64)


def semdedup_order(cos: np.ndarray, uids: np.ndarray) -> np.ndarray:
    """Indices in SemDeDup order: cos_to_centroid ascending, ties by uid (the ``hard`` order)."""
    hi, lo = uid_sort_keys(uids)
    return np.lexsort((lo, hi, np.asarray(cos, dtype=np.float64))).astype(np.int64)


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


def _cluster_m(x_ord: np.ndarray, block: int) -> np.ndarray:
    return max_sim_to_earlier(x_ord, block=block)


def _update_m(x_ord: np.ndarray, is_new: np.ndarray, old_m: np.ndarray, block: int) -> np.ndarray:
    """Exact M after adding members: ``x_ord`` (n, d) in SemDeDup order, ``is_new`` (n,) bool,
    ``old_m`` (n,) float32 (ignored where new). One ``(new x n)`` product, in row blocks."""
    n = x_ord.shape[0]
    out = np.where(is_new, np.float32(-np.inf), old_m).astype(np.float32)
    new_pos = np.flatnonzero(is_new)
    cols = np.arange(n)
    for s in range(0, new_pos.size, block):
        p = new_pos[s : s + block]
        g = x_ord[p] @ x_ord.T  # (b, n): row a = a new member, col j = any member
        earlier = cols[None, :] < p[:, None]
        # the new member's own M: max over every earlier member
        ga = np.where(earlier, g, -np.inf)
        out[p] = ga.max(axis=1)
        # every later member j gains the new member a as an earlier one
        gl = np.where(cols[None, :] > p[:, None], g, -np.inf).max(axis=0)
        np.maximum(out, gl.astype(np.float32), out=out)
    out[np.isneginf(out)] = -1.0
    return out


def bucket_scores(
    item: tuple,
    root: str,
    storage_options: dict | None,
    dtype: str,
    d: int,
    block: int,
    memory_budget_bytes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup ``M`` for the touched clusters of ONE bucket, read by this task from the lake.

    Args:
        item: ``(bucket, full, adds)``: the bucket name, cluster ids to recompute in full
            (None: every cluster of the bucket) and ``{cluster_id: (new_uids (m, 16) uint8,
            old_uids (o, 16) uint8, old_m (o,) float32)}`` for clusters that only gained members.
        root, storage_options: the lake (each task opens it itself).
        dtype, d: the layout's vector dtype and dimension.
        block: similarity block rows; memory_budget_bytes: see :class:`LayoutConfig`.

    Returns:
        ``(uids (n, 16) uint8, cluster_ids (n,) int32, cos (n,) float32, m (n,) float32)`` for
        the members of the recomputed clusters.
    """
    bucket, full, adds = item
    lake = Lake(root, storage_options or {})
    ds = lake.table(LAYOUT_TABLE).to_pyarrow_dataset()
    wanted = None if full is None else sorted(set(full) | set(adds))
    n_rows = ds.count_rows(filter=pc.field("bucket") == bucket)
    fits = n_rows * d * 4 <= memory_budget_bytes
    outs = []
    if fits:  # one read of the whole bucket; clusters are selected in memory (no filtered copy)
        rows = read_bucket(lake, bucket, vectors=True, dtype=dtype, dataset=ds)
    else:
        rows = read_bucket(lake, bucket, clusters=wanted, vectors=False, dtype=dtype, dataset=ds)
    cids = np.unique(rows.cluster_ids)
    if wanted is not None:
        cids = np.intersect1d(cids, np.asarray(wanted, dtype=cids.dtype))
    by_c = np.argsort(rows.cluster_ids, kind="stable")
    starts = np.searchsorted(rows.cluster_ids[by_c], cids, side="left")
    ends = np.searchsorted(rows.cluster_ids[by_c], cids, side="right")
    for c, a, b in zip(cids.tolist(), starts.tolist(), ends.tolist()):
        sel = by_c[a:b]
        order = sel[semdedup_order(rows.cos[sel], rows.uids[sel])]
        u, cos = rows.uids[order], rows.cos[order]
        if fits:
            x = rows.x[order]
        elif len(order) * d * 4 <= memory_budget_bytes:
            one = read_bucket(lake, bucket, clusters=[c], vectors=True, dtype=dtype, dataset=ds)
            x = one.x[semdedup_order(one.cos, one.uids)]
        else:
            x = _spill_cluster(lake, bucket, c, dtype, d)
        if c in adds:
            new_u, old_u, old_m = adds[c]
            is_new, m_old = _match_old(u, new_u, old_u, old_m)
            m = _update_m(np.asarray(x), is_new, m_old, block)
        elif isinstance(x, np.memmap):
            m = max_sim_to_earlier_blocked(x, block=block)
        else:
            m = _cluster_m(x, block)
        if isinstance(x, np.memmap):
            path = x.filename
            del x
            os.unlink(path)
        outs.append((u, np.full(len(u), c, np.int32), cos, m))
    if not outs:
        return np.zeros((0, UID_BYTES), np.uint8), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(4))


def _spill_cluster(lake: Lake, bucket: str, c: int, dtype: str, d: int) -> np.memmap:
    """A cluster above the memory budget, written in SemDeDup order to a temporary memmap,
    one record batch at a time (peak memory: one batch)."""
    meta = read_bucket(lake, bucket, clusters=[c], vectors=False, dtype=dtype)
    order = semdedup_order(meta.cos, meta.uids)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    fd, path = tempfile.mkstemp(prefix=f"semdedup_c{c}_", suffix=".f32")
    os.close(fd)
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(order.size, d))
    ds = lake.table(LAYOUT_TABLE).to_pyarrow_dataset()
    flt = (pc.field("bucket") == bucket) & (pc.field("cluster_id") == c)
    row = 0
    for batch in ds.to_batches(columns=[emb_column(dtype)], filter=flt, batch_size=8192):
        if batch.num_rows == 0:
            continue
        mm[rank[row : row + batch.num_rows]] = decode_vectors(batch.column(0), dtype)
        row += batch.num_rows
    mm.flush()
    log.info("cluster %d (%d rows) above the memory budget: scored in blocks from %s", c, order.size, path)
    return mm


# --------------------------------------------------------------------------- SemDeDup over the layout


@dataclass
class DedupUpdate:
    """Result of :func:`dedup_scores_by_bucket`.

    Attributes:
        frame: the ``dedup_scores`` rows (uid str, cluster_id i32, cos_to_centroid f32,
            max_sim_to_earlier f32), sorted by uid.
        mode: ``"full"`` or ``"incremental"``.
        recomputed_clusters: clusters recomputed in full; updated_clusters: clusters that
            got the exact add-only update; rows_scored: members of both.
    """

    frame: pl.DataFrame
    mode: str
    recomputed_clusters: int
    updated_clusters: int
    rows_scored: int


def dedup_scores_by_bucket(
    lake: Lake,
    executor: Executor | None = None,
    config: LayoutConfig = LayoutConfig(),
    incremental: bool = True,
) -> DedupUpdate:
    """SemDeDup ``M`` for the whole pool, one bucket per task, from the ``pool_by_cluster`` layout.

    With ``incremental`` and an existing ``dedup_scores`` table, only clusters whose members
    changed are scored (see the module docstring); the others keep their stored ``M``.

    Returns:
        A :class:`DedupUpdate` (the caller writes ``frame`` to ``dedup_scores``).
    """
    executor = executor or InProcessExecutor()
    asg = lake.read("assignments", columns=["uid", "cluster_id", "cos_to_centroid"])
    full_clusters: set[int] | None = None
    adds: dict[int, list] = {}
    keep = None
    mode = "full"
    if incremental and lake.exists("dedup_scores"):
        old = lake.read("dedup_scores")
        if "cos_to_centroid" in old.columns:
            mode = "incremental"
            j = asg.join(old.rename({"cluster_id": "c_old", "cos_to_centroid": "s_old"}), on="uid", how="full", coalesce=True)
            gone_or_moved = j.filter(pl.col("cluster_id").is_null() | (pl.col("c_old").is_not_null()
                                     & ((pl.col("c_old") != pl.col("cluster_id")) | (pl.col("s_old") != pl.col("cos_to_centroid")))))
            full_clusters = set(gone_or_moved["c_old"].drop_nulls().to_list()) | set(gone_or_moved["cluster_id"].drop_nulls().to_list())
            new_rows = j.filter(pl.col("c_old").is_null() & pl.col("cluster_id").is_not_null())
            add_clusters = set(new_rows["cluster_id"].to_list()) - full_clusters
            touched = full_clusters | add_clusters
            keep = old.filter(~pl.col("cluster_id").is_in(list(touched))).filter(pl.col("uid").is_in(asg["uid"]))
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
    pairs = lake.table(LAYOUT_TABLE).to_pyarrow_table(columns=["cluster_id", "bucket"])
    cb = pl.from_arrow(pairs).unique()
    if full_clusters is not None:
        cb = cb.filter(pl.col("cluster_id").is_in(list(full_clusters | set(adds))))
    items = []
    for (b,), g in cb.sort("bucket").group_by(["bucket"], maintain_order=True):
        cl = set(g["cluster_id"].to_list())
        items.append((b, None if full_clusters is None else sorted(cl & full_clusters),
                      {c: adds[c] for c in cl if c in adds}))
    dtype = layout_dtype(lake)
    d = _layout_dim(lake, dtype)
    results = executor.map(bucket_scores, items, root=lake.root, storage_options=dict(lake.storage_options) or None,
                           dtype=dtype, d=d, block=config.block, memory_budget_bytes=config.memory_budget_bytes)
    parts = [r for r in results if r[0].shape[0]]
    if parts:
        u = np.concatenate([r[0] for r in parts])
        fresh = pl.DataFrame({
            "uid": pl.Series(bytes_to_uids(u), dtype=pl.String),
            "cluster_id": pl.Series(np.concatenate([r[1] for r in parts]), dtype=pl.Int32),
            "cos_to_centroid": pl.Series(np.concatenate([r[2] for r in parts]), dtype=pl.Float32),
            "max_sim_to_earlier": pl.Series(np.concatenate([r[3] for r in parts]), dtype=pl.Float32),
        })
    else:
        fresh = pl.DataFrame(schema={"uid": pl.String, "cluster_id": pl.Int32, "cos_to_centroid": pl.Float32,
                                     "max_sim_to_earlier": pl.Float32})
    frame = pl.concat([keep.select(fresh.columns).cast(fresh.schema), fresh]) if keep is not None else fresh
    frame = frame.sort("uid")
    if frame.height != asg.height:
        raise ValueError(f"dedup_scores: got {frame.height} scores for {asg.height} assigned rows; expected one each "
                         "(the layout and assignments disagree: re-run concept_clusters with mode 'retrain')")
    n_full = len(full_clusters) if full_clusters is not None else int(cb["cluster_id"].n_unique())
    return DedupUpdate(frame, mode, n_full, len(adds), int(fresh.height))


def _groups(ids: np.ndarray) -> dict[int, np.ndarray]:
    """``{id: row indices}`` in one sort (not one pass over the rows per id)."""
    order = np.argsort(ids, kind="stable")
    u, starts = np.unique(ids[order], return_index=True)
    return {int(c): g for c, g in zip(u.tolist(), np.split(order, starts[1:]))}


def _layout_dim(lake: Lake, dtype: str) -> int:
    """Vector dimension of the layout, from the first row of one data file."""
    ds = lake.table(LAYOUT_TABLE).to_pyarrow_dataset()
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
                   factorized: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy CLIPCov for the classes of ONE bucket, read by this task from the lake.

    ``item = (bucket, [(member_uids (m, 16) uint8 in visiting order, budget), ...])``; returns
    one ``(picks, gains)`` per class (:func:`curation.select.clipcov.clipcov_greedy`)."""
    from curation.select.clipcov import clipcov_greedy

    bucket, classes = item
    ds = Lake(root, storage_options or {}).table(LAYOUT_TABLE).to_pyarrow_dataset()
    u, img, txt = _read_pairs(ds, bucket, dtype)
    out = []
    for members, b in classes:
        r = _rows_of(u, members)
        out.append(clipcov_greedy(img[r], txt[r], b, max_dense=max_dense, large=large, factorized=factorized))
    return out


def bucket_clip_scores(bucket: str, root: str, storage_options: dict | None, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(uids (n, 16) uint8, cos(image, caption) (n,) float32)`` of one bucket."""
    from curation.select.clipcov import clip_scores

    ds = Lake(root, storage_options or {}).table(LAYOUT_TABLE).to_pyarrow_dataset()
    u, img, txt = _read_pairs(ds, bucket, dtype)
    return u, clip_scores(img, txt)


@dataclass(frozen=True)
class LayoutRef:
    """Where a recipe reads aligned vectors bucket by bucket: the lake root, options, dtype and
    ``clusters_per_bucket`` of the ``pool_by_cluster`` layout (picklable, for Ray tasks)."""

    root: str
    storage_options: dict
    dtype: str
    clusters_per_bucket: int

    @classmethod
    def of(cls, lake: Lake) -> LayoutRef:
        state = layout_state(lake)
        cpb = sorted(set(state["clusters_per_bucket"].to_list())) if state is not None else []
        if len(cpb) != 1:
            raise ValueError(f"{LAYOUT_TABLE}: got clusters_per_bucket {cpb}; expected one layout")
        return cls(lake.root, dict(lake.storage_options), layout_dtype(lake), int(cpb[0]))

    def clip_scores(self, uids, executor: Executor | None = None) -> np.ndarray:
        """(n,) float32 CLIP score of every pool uid (str), one bucket per task."""
        executor = executor or InProcessExecutor()
        lake = Lake(self.root, self.storage_options)
        res = executor.map(bucket_clip_scores, lake.partitions(LAYOUT_TABLE), root=self.root,
                           storage_options=self.storage_options or None, dtype=self.dtype)
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
                           dtype=self.dtype, max_dense=max_dense, large=large, factorized=factorized)
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
    "DedupUpdate",
    "LayoutConfig",
    "LayoutUpdate",
    "bucket_scores",
    "build_layout",
    "dedup_scores_by_bucket",
    "fit_centroids",
    "iter_layout",
    "read_bucket",
    "semdedup_order",
    "training_sample",
    "update_layout",
]
