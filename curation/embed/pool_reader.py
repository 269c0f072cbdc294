"""Read the embedding pool back: all (or chosen) shards' vectors as one matrix.

:func:`read_pool` loads the ``embeddings`` Delta table (image and/or text columns) into ONE
preallocated contiguous ``(N, d) float32`` matrix per modality plus a uid array, streaming
Arrow record batches partition by partition, so peak memory is the output plus one batch
(measured in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.compute as pc

from curation.storage.lake import TABLES, Lake, list_column_to_matrix

log = logging.getLogger(__name__)

#: the ``embeddings`` table's modalities and their vector columns (defined here, not beside the
#: embedding code, so the pool-wide half reads the pool without importing torch: ~0.7 GiB of
#: RSS and ~1.6 s in every pool step's process)
MODALITIES = ("image", "text")
_EMB_COLUMNS = {"image": "image_emb", "text": "text_emb"}


# --------------------------------------------------------------------------- read the pool


@dataclass
class PoolEmbeddings:
    """All (or chosen) shards' embeddings as contiguous arrays.

    Attributes:
        uids: ``(N,)`` str (32 hex chars).
        shards: ``(N,)`` str, the shard partition of each row.
        image: ``(N, d) float32`` unit-norm rows, or None if not requested.
        text: ``(N, d') float32`` unit-norm rows, or None if not requested.
        encoders: the distinct encoder ids of the rows (one, unless ``allow_mixed``).

    Rows are ordered by shard key, then by their order within the shard's Delta files.
    """

    uids: np.ndarray
    shards: np.ndarray
    image: np.ndarray | None
    text: np.ndarray | None
    encoders: list[str]

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def encoder(self) -> str | None:
        """The single encoder id (None for an empty pool)."""
        return self.encoders[0] if len(self.encoders) == 1 else None


def read_pool(
    lake: Lake,
    shards: Sequence[str] | None = None,
    columns: Sequence[str] = MODALITIES,
    table: str = "embeddings",
    allow_mixed: bool = False,
) -> PoolEmbeddings:
    """Read embeddings into one preallocated matrix per modality, partition by partition.

    Args:
        lake: the lake.
        shards: shard keys to read (None: every partition of the table). Keys without rows
            contribute nothing.
        columns: modalities to load, a subset of ``("image", "text")``.
        table: the table to read (``"embeddings"``; any table with the same columns).
        allow_mixed: allow rows from different encoders (otherwise a ValueError names them;
            vectors of different encoders do not live in one space).

    Returns:
        :class:`PoolEmbeddings`. Peak memory is the output arrays plus one Arrow record batch.

    Raises:
        ValueError: unknown modality, mixed encoders or inconsistent dimensions.
    """
    cols = list(columns)
    bad = [c for c in cols if c not in MODALITIES]
    if bad:
        raise ValueError(f"columns: got {bad}; expected a subset of {list(MODALITIES)}")
    part_col = TABLES.get(table)
    empty = PoolEmbeddings(
        np.zeros(0, dtype="<U32"), np.zeros(0, dtype="<U1"),
        np.zeros((0, 0), np.float32) if "image" in cols else None,
        np.zeros((0, 0), np.float32) if "text" in cols else None, [],
    )
    if not lake.exists(table):
        return empty
    dt = lake.table(table)
    ds = lake.dataset(table, dt)
    all_parts = lake.partitions(table) if part_col else [None]
    parts = sorted(set(all_parts) & set(shards)) if shards is not None else all_parts
    if shards is not None and part_col is None:
        raise ValueError(f"table {table!r} is not partitioned; shards must be None")

    def part_filter(p):
        return None if p is None else (pc.field(part_col) == p)

    counts = [ds.count_rows(filter=part_filter(p)) for p in parts]
    total = int(sum(counts))
    if total == 0:
        return empty

    read_cols = ["uid", "encoder"] + ([part_col] if part_col else []) + [_EMB_COLUMNS[c] for c in cols]
    uid_out = np.empty(total, dtype="<U32")
    shard_width = max((len(p) for p in parts if p is not None), default=1)
    shard_out = np.empty(total, dtype=f"<U{shard_width}")
    mats: dict[str, np.ndarray | None] = {c: None for c in cols}
    encoders: dict[str, str] = {}  # encoder id -> first shard that used it
    row = 0
    for p, cnt in zip(parts, counts):
        if cnt == 0:
            continue
        for batch in ds.to_batches(columns=read_cols, filter=part_filter(p), batch_size=65_536):
            b = batch.num_rows
            if b == 0:
                continue
            if row + b > total:
                raise ValueError(f"table {table!r} changed while it was read (more rows than counted)")
            for enc in pc.unique(batch.column("encoder")).to_pylist():
                encoders.setdefault(enc, p)
            if len(encoders) > 1 and not allow_mixed:
                raise ValueError(
                    f"embeddings from different encoders: {encoders} (encoder -> first shard); "
                    "re-embed those shards with one encoder or pass allow_mixed=True"
                )
            for c in cols:
                m = list_column_to_matrix(batch.column(_EMB_COLUMNS[c]))
                if mats[c] is None:
                    mats[c] = np.empty((total, m.shape[1]), dtype=np.float32)
                elif m.shape[1] != mats[c].shape[1]:
                    raise ValueError(
                        f"{c} embeddings of shard {p!r} have {m.shape[1]} dims; earlier shards have {mats[c].shape[1]}"
                    )
                mats[c][row : row + b] = m
                del m
            uid_out[row : row + b] = batch.column("uid").to_numpy(zero_copy_only=False)
            shard_out[row : row + b] = p if p is not None else ""
            row += b
    if row != total:
        raise ValueError(f"table {table!r} changed while it was read ({row} rows read, {total} counted)")
    return PoolEmbeddings(
        uids=uid_out,
        shards=shard_out,
        image=mats.get("image") if "image" in cols else None,
        text=mats.get("text") if "text" in cols else None,
        encoders=sorted(encoders),
    )


def iter_pool_partitions(
    lake: Lake,
    shards: Sequence[str] | None = None,
    columns: Sequence[str] = ("image",),
    table: str = "embeddings",
    batch_size: int = 65_536,
):
    """Stream a partitioned embeddings table ONE shard partition at a time.

    Yields:
        ``(shard, uids, mats, encoders)``: the shard key, an Arrow ``string`` array of its
        uids, ``{modality: (n, d) float32}`` and the set of encoder ids of its rows. Peak
        memory is one partition (never the pool).
    """
    part_col = TABLES.get(table)
    if part_col is None:
        raise ValueError(f"table {table!r}: got an unpartitioned table; expected one partitioned by shard")
    if not lake.exists(table):
        return
    dt = lake.table(table)  # one snapshot for the listing and the reads
    parts = lake.partitions(table, dt)
    if shards is not None:
        parts = sorted(set(parts) & set(shards))
    if not parts:
        return
    # only the wanted partitions' files (a new shard of a 1M pool: 96 -> 63 ms, most of the
    # rest its read)
    ds = lake.dataset(table, dt, [(part_col, "in", parts)] if shards is not None else None)
    read_cols = ["uid", "encoder"] + [_EMB_COLUMNS[c] for c in columns]
    for p in parts:
        tbl = ds.to_table(columns=read_cols, filter=pc.field(part_col) == p, batch_size=batch_size)
        if tbl.num_rows == 0:
            continue
        mats = {c: list_column_to_matrix(tbl.column(_EMB_COLUMNS[c])) for c in columns}
        yield p, tbl.column("uid").combine_chunks(), mats, set(pc.unique(tbl.column("encoder")).to_pylist())
        del tbl, mats


def partition_fingerprints(lake: Lake, table: str = "embeddings") -> dict[str, str]:
    """``{partition: fingerprint}``: a hash of the Delta data files holding each partition.

    A partition rewritten (a shard re-embedded after its content changed) gets new files and
    so a new fingerprint; an untouched partition keeps its fingerprint across table versions.
    """
    import hashlib

    part_col = TABLES.get(table)
    if part_col is None or not lake.exists(table):
        return {}
    files = lake.partition_files(table)
    return {p: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest()[:16] for p, v in files.items()}


__all__ = [
    "PoolEmbeddings",
    "iter_pool_partitions",
    "partition_fingerprints",
    "read_pool",
]
