"""The writer of img2dataset-style webdataset shards from any source of records.

A :class:`Source` is anything with a ``name`` and ``iter_records()`` yielding
:class:`Record` s (key, image bytes + extension, caption, metadata); :func:`write_shards`
turns records into ``NNNNN.tar`` shards (``KEY.<ext>``, ``KEY.txt``, ``KEY.json``) plus a
``NNNNN.parquet`` of the same metadata, the layout img2dataset produces. Plugging in another
source is one small class.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import polars as pl

from curation.ingest.images import IMAGE_EXTS, ImageRejected, open_image
from curation.ingest.shards import AtomicTarWriter

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_FILE_RE = re.compile(r"^\d{5}\.(tar|parquet)$")
# tar headers carry this mtime so identical inputs give byte-identical shards
_FIXED_MTIME = 1_700_000_000


# --------------------------------------------------------------------------- records / sources


@dataclass(frozen=True)
class Record:
    """One image-caption pair from a source.

    Attributes:
        key: the source's stable id of the sample (``[A-Za-z0-9_]+``).
        image: encoded image bytes.
        ext: image extension, one of ``png``, ``jpg``, ``jpeg``, ``webp``.
        caption: the text paired with the image.
        metadata: JSON-serialisable fields written to ``KEY.json`` and the shard parquet
            (the default dataset writes source, license, group, subgroup, concept, ...).
    """

    key: str
    image: bytes
    ext: str
    caption: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """A source of records: a name (the dataset name) and an iterator of :class:`Record`."""

    name: str

    def iter_records(self) -> Iterator[Record]: ...


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: ``tar`` and ``parquet`` paths and the number of samples."""

    tar: Path
    parquet: Path
    samples: int


def _image_size(data: bytes, ext: str) -> tuple[int, int]:
    """Upright size from the header, under the platform's image rules (raises ImageRejected)."""
    im = open_image(data, ext, max_pixels=1 << 62, max_aspect_ratio=float("inf"), decode=False)
    return im.width, im.height


def write_shards(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 500,
    rekey: bool = True,
    start_index: int = 0,
) -> list[ShardInfo]:
    """Write records as img2dataset-style webdataset shards ``NNNNN.tar`` + ``NNNNN.parquet``.

    Each sample becomes ``KEY.<ext>`` (image), ``KEY.txt`` (caption) and ``KEY.json``
    (``key``, ``caption``, ``source_key``, ``width``, ``height`` plus the record metadata);
    the parquet has one row per sample with the same fields and ``status="success"``.
    Files are written to a hidden temp name and renamed, parquet first, so a watcher of
    ``*.tar`` never sees a partial shard. Output is byte-for-byte deterministic.

    Args:
        records: iterable of :class:`Record`, in the order they should be written.
        out_dir: directory for the shards (created).
        samples_per_shard: samples per tar (the last one may hold fewer).
        rekey: ``True`` names samples img2dataset-style, ``f"{shard:05d}{i:04d}"``, and keeps
            the record key as ``source_key``; ``False`` uses the record keys as they are.
        start_index: number of the first shard.

    Returns:
        The written shards in order.

    Raises:
        ValueError: on bad ``samples_per_shard``, an unknown extension, or an unsafe key.
    """
    if samples_per_shard < 1 or (rekey and samples_per_shard > 10_000):
        raise ValueError(f"samples_per_shard: got {samples_per_shard}; expected 1..10000")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    batch: list[Record] = []

    def flush() -> None:
        idx = start_index + len(shards)
        stem = f"{idx:05d}"
        rows = []
        pq_tmp = out / f".{stem}.parquet.{os.getpid()}.tmp"
        pq, tar = out / f"{stem}.parquet", out / f"{stem}.tar"
        tf = AtomicTarWriter(tar, mtime=_FIXED_MTIME)
        try:
            for i, rec in enumerate(batch):
                ext = rec.ext.lower()
                if ext not in IMAGE_EXTS:
                    raise ValueError(f"record {rec.key!r} ext: got {rec.ext!r}; expected one of {IMAGE_EXTS}")
                if not _KEY_RE.match(rec.key):
                    raise ValueError(f"record key: got {rec.key!r}; expected [A-Za-z0-9_]+")
                key = f"{idx:05d}{i:04d}" if rekey else rec.key
                try:
                    w, h = _image_size(rec.image, ext)
                except ImageRejected as e:
                    raise ValueError(
                        f"record {rec.key!r}: {e.reason}: {e.detail}; expected one of {IMAGE_EXTS} with matching content"
                    ) from None
                meta = {"key": key, "caption": rec.caption, "source_key": rec.key, "width": w, "height": h}
                meta.update(rec.metadata)
                tf.add(f"{key}.{ext}", rec.image)
                tf.add(f"{key}.txt", rec.caption.encode("utf-8"))
                tf.add(f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
                rows.append({**meta, "status": "success"})
            pl.DataFrame(rows).write_parquet(pq_tmp, statistics=False)
            os.replace(pq_tmp, pq)  # parquet first: a watcher of *.tar never sees a tar without it
            tf.commit()
        except BaseException:
            tf.abort()
            pq_tmp.unlink(missing_ok=True)
            raise
        shards.append(ShardInfo(tar=tar, parquet=pq, samples=len(batch)))
        batch.clear()

    for rec in records:
        batch.append(rec)
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return shards


def remove_stale_shards(out_dir: str | os.PathLike, keep: Sequence[ShardInfo]) -> list[Path]:
    """Delete ``NNNNN.tar|parquet`` files in ``out_dir`` that a rebuild did not write.

    Only files named like shards are touched (a rebuild with a smaller ``limit`` must not
    leave old shards behind for the sensor). Returns the removed paths.
    """
    keep_names = {p.name for s in keep for p in (s.tar, s.parquet)}
    removed = []
    for p in sorted(Path(out_dir).glob("*")):
        if p.is_file() and _SHARD_FILE_RE.match(p.name) and p.name not in keep_names:
            p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d stale shard files from %s", len(removed), out_dir)
    return removed
