"""Delta Lake storage: the tables of the platform and idempotent partition writes.

All tables live under one root URI (a local path by default; ``s3://``, ``gs://`` or
``abfs://`` with deltalake storage options). Writes that name a partition replace
exactly that partition (``mode="overwrite"`` with a predicate), so re-materializing a
partition never duplicates rows.

Concurrency (two runs writing their first partitions at the same moment): a table is created
once, with the schema of the data, by :meth:`Lake.ensure_table` (``DeltaTable.create`` in
``ignore`` mode; a creator that loses the race finds the winner's table). Every partition
write is then an overwrite *with a predicate* on its own partition, never a whole-table
overwrite, and a commit that conflicts with a concurrent one is retried against the new
table version (:data:`COMMIT_RETRIES` times, jittered backoff); the predicate makes the
retry idempotent. :meth:`Lake.vacuum` removes data files no commit references (what a
killed writer leaves behind) once they are older than the retention. Embedding columns are ``List(Float32)`` because Delta
has no fixed-size array type; :func:`list_column_to_matrix` casts them back to a
contiguous ``(n, d) float32`` matrix without going through Python lists.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pa_fs
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

log = logging.getLogger(__name__)

# Table name -> partition column (None: unpartitioned). The schemas are in docs/architecture.md.
TABLES: dict[str, str | None] = {
    "samples": "shard",
    "quarantine": "shard",
    "embeddings": "shard",
    "clusters": None,
    "centroids": None,
    "assignments": None,
    "dedup_scores": None,
    # the pool laid out by concept cluster (curation.select.layout): one partition per bucket
    "pool_by_cluster": "bucket",
    "pool_by_cluster_shards": None,
    # the layout shard fingerprints dedup_scores was computed from (its incremental state)
    "dedup_scores_shards": None,
    "filter_embeddings": None,
    "subsets": "recipe",
    "checkpoints": "recipe",
    "eval_results": "recipe",
}


#: tables keyed by a unique, hashed uid that every curation pass rewrites (whole, or a recipe's
#: partition) or appends to: their ``uid`` column is written PLAIN, without a dictionary or
#: statistics, and pages uncompressed (32 random hex characters: the writer otherwise fills a
#: dictionary page before it falls back, and min/max stats of hashes skip nothing). 1M
#: ``dedup_scores`` rows of hashed uids: overwritten in 0.22 instead of 0.29 s, read in 0.033
#: instead of 0.066 s, 45.5 instead of 39.7 MiB; a 544k-row ``subsets`` partition rewritten in
#: 0.13 instead of 0.19 s (docs/benchmarks.md).
UID_PLAIN_TABLES = frozenset({"assignments", "dedup_scores", "subsets"})
#: per table, its number columns written PLAIN without a dictionary, statistics kept: the
#: unique numbers of the uid-keyed tables (a cosine, a score, a rank: the writer's dictionary
#: attempt and fallback cost a page for nothing; 1M ``dedup_scores`` rows overwritten in 0.10
#: instead of 0.16 s, medians of 3, 43.2 instead of 44.3 MiB, ``docs/benchmarks.md`` session
#: 15) and the layout's cluster and cos, which a read of a bucket in several files views in the
#: mapped pages (``curation.select.layout.read_bucket``; cluster_id's statistics prune its row
#: groups)
PACKED_COLUMNS: dict[str, tuple[str, ...]] = {
    "assignments": ("cos_to_centroid",),
    "dedup_scores": ("cos_to_centroid", "max_sim_to_earlier"),
    "subsets": ("rank", "score"),
    "pool_by_cluster": ("cluster_id", "cos_to_centroid"),
}

#: how often a partition write is retried after a commit conflict with a concurrent writer
COMMIT_RETRIES = 20
#: default retention of :meth:`Lake.vacuum` (Delta's own default, one week)
VACUUM_RETENTION_HOURS = 168


def plain_writer_properties(columns, max_row_group_size: int | None = None, packed=()):
    """Uncompressed Parquet pages, and ``columns`` (unique values of random bytes: hashed uids,
    vectors) written PLAIN, without a dictionary or statistics; ``packed`` (fixed-width numbers
    that repeat little, or that a reader views in place, see
    :mod:`curation.storage.parquet_pages`) PLAIN without a dictionary, their statistics kept."""
    from deltalake import ColumnProperties, WriterProperties

    plain = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE", encoding="PLAIN")
    props = {c: plain for c in columns}
    props.update({c: ColumnProperties(dictionary_enabled=False, encoding="PLAIN") for c in packed})
    extra = {} if max_row_group_size is None else {"max_row_group_size": max_row_group_size}
    return WriterProperties(compression="UNCOMPRESSED", column_properties=props, **extra)


def writer_properties(table: str):
    """The Parquet settings of ``table``'s writes (None: deltalake's defaults); see
    :data:`UID_PLAIN_TABLES` and :data:`PACKED_COLUMNS`."""
    if table not in UID_PLAIN_TABLES:
        return None
    return plain_writer_properties(["uid"], packed=PACKED_COLUMNS.get(table, ()))


def _sql_literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class Lake:
    """A lake root plus deltalake storage options.

    Args:
        root: local directory or object-store URI (``s3://bucket/prefix``).
        storage_options: passed to deltalake (credentials, endpoint, ...).
    """

    root: str
    storage_options: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def uri(self, table: str) -> str:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(TABLES)}")
        return self.root.rstrip("/") + "/" + table

    def _opts(self) -> dict[str, str] | None:
        return dict(self.storage_options) or None

    def _local_path(self, table: str) -> str:
        """``table``'s directory on this machine (a local lake only)."""
        return os.path.abspath(self.uri(table).removeprefix("file://"))

    def exists(self, table: str) -> bool:
        """Whether ``table`` has a Delta log. Local: a look at its ``_delta_log`` for a commit
        or checkpoint file (~20 us; opening the table replays its log, ~4 ms at 1M rows, and a
        re-curation asks ~20 times); elsewhere: opening it."""
        if self.is_local:
            log_dir = os.path.join(self._local_path(table), "_delta_log")
            try:
                with os.scandir(log_dir) as it:
                    return any(e.name.endswith((".json", ".checkpoint.parquet")) and e.name[:1].isdigit() for e in it)
            except (FileNotFoundError, NotADirectoryError):
                return False
        try:
            DeltaTable(self.uri(table), storage_options=self._opts())
            return True
        except TableNotFoundError:
            return False

    def table(self, table: str) -> DeltaTable:
        return DeltaTable(self.uri(table), storage_options=self._opts())

    def filesystem(self, table: str, mmap: bool = False) -> pa_fs.FileSystem | None:
        """The pyarrow filesystem that reads ``table``'s data files: for a local lake Arrow's own
        local one rooted at the table; None elsewhere (deltalake's object store).

        deltalake's default reads a local file through a Python filesystem handler: every read
        call takes the GIL, so reads of two threads serialize and a read costs ~1.3-1.5x more
        (1.38 s vs 0.88-1.09 s for the 1.9 GiB ``pool_by_cluster`` table at 1M rows, page cache
        warm). Reads are syscalls, which ``/proc/self/io`` counts and the benchmarks report;
        ``mmap=True`` memory-maps the files instead (one copy fewer: the Parquet decoder reads
        the page cache in place), which the pool's by-cluster layout uses for its vectors
        (:func:`curation.select.layout.layout_dataset`, with its own byte count). Delta data
        files are written once and never changed in place, so a mapping stays valid (a
        vacuumed file lives on until unmapped).
        """
        if not self.is_local:
            return None
        return pa_fs.SubTreeFileSystem(self._local_path(table), pa_fs.LocalFileSystem(use_mmap=mmap))

    def dataset(self, table: str, dt: DeltaTable | None = None, file_pruning_predicate=None, mmap: bool = False):
        """``table`` (or the open snapshot ``dt`` of it) as a pyarrow dataset read through
        :meth:`filesystem` (memory-mapped with ``mmap`` on a local lake);
        ``file_pruning_predicate`` as in ``DeltaTable.to_pyarrow_dataset``."""
        dt = dt if dt is not None else self.table(table)
        return dt.to_pyarrow_dataset(filesystem=self.filesystem(table, mmap=mmap), file_pruning_predicate=file_pruning_predicate)

    def count_rows(self, table: str, partition: str | None = None) -> int:
        """Rows of ``table`` or of one of its partitions (from the Parquet footers: no data page
        is read, so counting 10M rows costs what listing their files does)."""
        if partition is None:
            return self.dataset(table).count_rows()
        part_col = TABLES[table]
        if part_col is None:
            raise ValueError(f"table {table!r} is not partitioned")
        return self.dataset(table, file_pruning_predicate=[(part_col, "=", partition)]).count_rows()

    def partition_files(self, table: str, dt: DeltaTable | None = None) -> dict[str, list[str]]:
        """``{partition: its data files' paths}`` of a partitioned table (of the open snapshot
        ``dt`` when given), from the log's add actions alone: no data file is opened."""
        part_col = TABLES[table]
        if part_col is None:
            raise ValueError(f"table {table!r} is not partitioned")
        dt = dt if dt is not None else self.table(table)
        acts = pa.table(dt.get_add_actions(flatten=True)).select(["path", f"partition.{part_col}"])  # arro3 -> pyarrow
        files: dict[str, list[str]] = {}
        for path, part in zip(acts.column(0).to_pylist(), acts.column(1).to_pylist()):
            files.setdefault(part, []).append(path)
        return files

    def partition_counts(self, table: str) -> dict[str, int]:
        """``{partition: rows}`` of a partitioned table (empty when it does not exist)."""
        return {p: self.count_rows(table, p) for p in self.partitions(table)}

    def write(
        self,
        table: str,
        data: pl.DataFrame | pa.Table,
        partition: str | None = None,
        mode: str = "overwrite",
        where: Mapping[str, str] | None = None,
    ) -> int:
        """Write ``data`` to ``table``.

        With ``partition`` (a value of the table's partition column) the write replaces
        exactly that partition and leaves the others alone; ``where`` narrows the replaced
        rows further (``{"stage": "embed"}`` replaces only that stage's rows of the
        partition, so two stages can share one table partition). Without it, ``mode``
        ``"overwrite"`` replaces the whole table and ``"append"`` appends.

        Returns:
            The number of rows written.
        """
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
        arrow = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        part_col = TABLES[table]
        opts = self._opts()
        if partition is None:
            kwargs: dict = {"storage_options": opts, "writer_properties": writer_properties(table)}
            if part_col is not None:
                kwargs["partition_by"] = [part_col]
            if mode == "overwrite":
                kwargs["schema_mode"] = "overwrite"
            self._commit(lambda: write_deltalake(self.uri(table), arrow, mode=mode, **kwargs), table)
            log.info("wrote %d rows to %s", arrow.num_rows, table)
            return arrow.num_rows
        if part_col is None:
            raise ValueError(f"table {table!r} is not partitioned")
        col = arrow.column(part_col)
        if len(col) and set(col.unique().to_pylist()) != {partition}:
            raise ValueError(f"rows for partition {partition!r} carry other {part_col} values")
        self.ensure_table(table, arrow.schema)
        conds = [f"{part_col} = {_sql_literal(partition)}"]
        for col_name, value in (where or {}).items():
            conds.append(f"{col_name} = {_sql_literal(value)}")
        predicate = " AND ".join(conds)
        self._commit(
            lambda: write_deltalake(
                self.uri(table), arrow, mode="overwrite", predicate=predicate, storage_options=opts,
                writer_properties=writer_properties(table),
            ),
            table,
        )
        log.info("wrote %d rows to %s[%s]", arrow.num_rows, table, partition)
        return arrow.num_rows

    def ensure_table(self, table: str, schema: pa.Schema) -> None:
        """Create ``table`` with ``schema`` (partitioned by its column) unless it exists.

        Safe under concurrency: of several processes creating the same table at once, one
        commits version 0 and the others find that table (a conflict is not an error here).
        """
        if self.exists(table):
            return
        part_col = TABLES[table]
        try:
            DeltaTable.create(
                self.uri(table),
                schema,
                mode="ignore",
                partition_by=[part_col] if part_col else None,
                storage_options=self._opts(),
            )
            log.info("created table %s", table)
        except (CommitFailedError, DeltaError, OSError) as e:
            if not self.exists(table):
                raise
            log.info("table %s was created concurrently (%s)", table, type(e).__name__)

    @staticmethod
    def _commit(fn, table: str):
        """Run a write, retrying when a concurrent commit won the race for the next version."""
        for attempt in range(COMMIT_RETRIES + 1):
            try:
                return fn()
            except CommitFailedError as e:
                if attempt == COMMIT_RETRIES:
                    raise
                delay = min(2.0, 0.02 * 2**attempt) * (0.5 + random.random())
                log.info("commit conflict on %s (%s); retry %d in %.2fs", table, e, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def vacuum(self, table: str, retention_hours: int = VACUUM_RETENTION_HOURS, dry_run: bool = False) -> list[str]:
        """Delete files of ``table`` that no commit references and that are older than
        ``retention_hours``: removed partitions' old files and the orphans of killed writes
        (``full`` vacuum). Younger files are kept: they may belong to a write in flight.

        Returns:
            The paths (relative to the table) that were (or, with ``dry_run``, would be) deleted.
        """
        if not self.exists(table):
            return []
        removed = self.table(table).vacuum(
            retention_hours=retention_hours,
            dry_run=dry_run,
            enforce_retention_duration=False,
            full=True,
        )
        if removed:
            log.info("vacuum %s: %d unreferenced files%s", table, len(removed), " (dry run)" if dry_run else "")
        return list(removed)

    def delete_partition(self, table: str, partition: str) -> None:
        part_col = TABLES[table]
        if part_col is None or not self.exists(table):
            return
        self.table(table).delete(f"{part_col} = {_sql_literal(partition)}")

    def read(
        self,
        table: str,
        columns: Sequence[str] | None = None,
        partitions: Iterable[str] | None = None,
    ) -> pl.DataFrame:
        """Read ``table`` (optionally only some columns / partitions) into polars."""
        dt = self.table(table)
        part_col = TABLES[table]
        filters = None
        if partitions is not None:
            parts = list(partitions)
            if part_col is None:
                raise ValueError(f"table {table!r} is not partitioned")
            if not parts:
                empty = pl.DataFrame(pa.schema(dt.schema().to_arrow()).empty_table())
                return empty.select(list(columns)) if columns else empty
            filters = [(part_col, "in", parts)]
        arrow = dt.to_pyarrow_table(columns=list(columns) if columns else None, filters=filters,
                                    filesystem=self.filesystem(table))
        return pl.from_arrow(arrow)

    def read_uids(self, table: str, uids, columns: Sequence[str], ordered: bool = False) -> pl.DataFrame:
        """The rows (``columns``, uid first) of ``table`` whose ``uid`` is in ``uids``, streamed:
        polars scans the table in morsels and joins them against the wanted uids, so memory
        holds the matching rows, never the whole table (the eager read + join of 10M
        ``samples`` rows peaked at ~4 GiB). ``ordered``: in the order of ``uids`` (which must
        then be unique), else in the table's."""
        cols = list(dict.fromkeys(["uid", *columns]))
        want = pl.DataFrame({"uid": uids.cast(pl.String) if isinstance(uids, pl.Series)
                             else pl.Series(list(uids), dtype=pl.String)})
        rows = self.scan(table).select(cols)
        if not ordered:
            return rows.join(want.lazy(), on="uid", how="semi").collect(engine="streaming")
        want = want.with_columns(pl.Series("__at", np.arange(want.height, dtype=np.int64)))
        # the matching rows are sorted after the streamed join, eagerly: a sort inside the
        # streaming plan costs more (1M samples, 544k wanted: 0.213 vs 0.25 s)
        return rows.join(want.lazy(), on="uid", how="inner").collect(engine="streaming").sort("__at").drop("__at")

    def scan(self, table: str) -> pl.LazyFrame:
        """``table`` as a polars LazyFrame (``scan_delta``): filters and projections are pushed
        into the Parquet reads, and a streaming collect holds only the matching rows."""
        return pl.scan_delta(self.uri(table), storage_options=self._opts())

    def read_where(self, table: str, columns: Sequence[str], predicate: pl.Expr) -> pl.DataFrame:
        """The rows (``columns``) of ``table`` where ``predicate`` holds, streamed: memory holds
        the matching rows, never the whole table (e.g. one cluster's rows of 10M assignments)."""
        return self.scan(table).filter(predicate).select(list(columns)).collect(engine="streaming")

    def partitions(self, table: str, dt: DeltaTable | None = None) -> list[str]:
        """``table``'s partition values, sorted (of the open snapshot ``dt`` when given)."""
        part_col = TABLES[table]
        if part_col is None or (dt is None and not self.exists(table)):
            return []
        return sorted({p[part_col] for p in (dt if dt is not None else self.table(table)).partitions()})


def release_memory() -> None:
    """Hand Arrow's freed memory back to the OS (its allocator keeps it for reuse otherwise):
    after a pool-wide read of 10M rows, ~0.5 GB that the next stage's peak would sit on."""
    pa.default_memory_pool().release_unused()


def matrix_to_list_column(mat: np.ndarray) -> pa.Array:
    """``(n, d) float32`` -> Arrow ``List(Float32)`` without Python objects."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    n, d = mat.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(mat.reshape(-1)))


def list_column_to_matrix(col: pa.ChunkedArray | pa.Array | pl.Series, dim: int | None = None) -> np.ndarray:
    """Arrow/polars ``List(Float32)`` column -> contiguous ``(n, d) float32`` matrix.

    Raises:
        ValueError: if the rows do not all have the same length.
    """
    if isinstance(col, pl.Series):
        col = col.to_arrow()
    if isinstance(col, pa.ChunkedArray):
        chunks = col.chunks
    else:
        chunks = [col]
    parts = []
    for ch in chunks:
        if pa.types.is_large_list(ch.type):
            ch = ch.cast(pa.list_(pa.float32()))
        n = len(ch)
        if n == 0:
            continue
        flat = ch.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        d = flat.size // n
        if d * n != flat.size:
            raise ValueError("embedding rows have different lengths")
        offs = np.asarray(ch.offsets)
        if not np.all(np.diff(offs) == d):
            raise ValueError("embedding rows have different lengths")
        parts.append(flat.reshape(n, d))
    if not parts:
        return np.zeros((0, dim or 0), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])
