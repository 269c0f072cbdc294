"""Ingest assets: ``raw_shards[shard]`` (the landed file) -> ``samples[shard]`` (+ quarantine).

Thin adapters over :mod:`curation.ingest.shards`: ``raw_shards`` records what landed (bytes, sha256,
members; its data version is the file hash, so a replaced file makes ``samples`` stale);
``samples`` streams the shard through :func:`curation.ingest.shards.read_shard` and replaces its
partition of the ``samples`` table and its stage-``ingest`` rows of the ``quarantine`` table.
"""


import hashlib
import logging
import tarfile
import time
from pathlib import Path

import dagster as dg
import polars as pl

from assets import previews
from assets.metadata import md_table
from assets.partitions import shard_partitions
from curation.ingest.shards import (
    DEFAULT_MAX_CAPTION_BYTES,
    INGEST_STAGE,
    QUARANTINE_SCHEMA,
    SAMPLES_SCHEMA,
    parse_shard_key,
    read_shard,
    shard_path,
)
from resources import DatasetsResource, LakeResource

GROUP = "ingest"


def _file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _count_members(path: Path) -> tuple[int, str | None]:
    """(file members, error) of a tar read as a stream; error is None for a clean tar."""
    n = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                if info.isfile():
                    n += 1
    except Exception as e:  # noqa: BLE001 - any unreadable input is reported, not raised
        return n, f"{type(e).__name__}: {e}"
    return n, None


@dg.asset(
    partitions_def=shard_partitions,
    group_name=GROUP,
    kinds={"webdataset"},
    description="A raw img2dataset-style shard in the landing zone: size, sha256, member count. "
    "Its data version is the file's sha256, so a replaced file makes `samples` stale.",
)
def raw_shards(context: dg.AssetExecutionContext, datasets: DatasetsResource) -> dg.MaterializeResult:
    key = context.partition_key
    path = shard_path(datasets.landing, key)
    if not path.is_file():
        # deleted after it landed: materialize the absence, so `samples` tombstones the rows
        context.log.warning("shard %s: %s is gone from the landing zone; its rows will be tombstoned", key, path)
        return dg.MaterializeResult(
            data_version=dg.DataVersion("deleted"),
            metadata={"path": dg.MetadataValue.path(str(path)), "status": "deleted", "bytes": 0, "sha256": ""},
        )
    t0 = time.perf_counter()
    sha = _file_sha256(path)
    members, error = _count_members(path)
    is_tar = not (error is not None and members == 0)
    status = "ok" if error is None else ("not a tar" if not is_tar else "damaged tar")
    if error is not None:
        context.log.warning("shard %s (%s): %s; samples will quarantine what cannot be read", key, path, error)
    manifest = path.with_suffix(".parquet")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "bytes": path.stat().st_size,
            "sha256": sha,
            "members": members,
            "is_tar": is_tar,
            "status": status,
            "error": error or "",
            "has_parquet_manifest": manifest.is_file(),
            "seconds": round(time.perf_counter() - t0, 4),
        },
    )


@dg.asset(
    partitions_def=shard_partitions,
    deps=[raw_shards],
    group_name=GROUP,
    kinds={"delta", "polars"},
    description="One row per readable sample of the shard (`samples` Delta table); every other "
    "key goes to `quarantine` with stage `ingest` and a reason code. Nothing is dropped. A shard "
    "deleted from the landing zone is tombstoned: no samples rows, every key `shard_deleted`.",
)
def samples(
    context: dg.AssetExecutionContext, lake: LakeResource, datasets: DatasetsResource
) -> dg.MaterializeResult:
    key = context.partition_key
    dataset, _ = parse_shard_key(key)
    path = shard_path(datasets.landing, key)
    db = lake.lake()
    t0 = time.perf_counter()
    if not path.is_file():
        return _tombstone(context, db, dataset, key, path)
    res = read_shard(path, dataset, key, max_pixels=datasets.max_pixels)
    read_s = time.perf_counter() - t0
    sdf = res.samples_frame()
    qdf = res.quarantine_frame()
    db.write("samples", sdf, partition=key)
    db.write("quarantine", qdf, partition=key, where={"stage": INGEST_STAGE})
    seconds = time.perf_counter() - t0
    reasons = res.reasons()
    if qdf.height:
        context.log.warning("shard %s: quarantined %d of %d keys: %s", key, qdf.height, res.keys_seen, reasons)
    metadata = {
        "dataset": dataset,
        "rows": sdf.height,
        "quarantined": qdf.height,
        "keys_seen": res.keys_seen,
        "members": res.members,
        "truncated": res.truncated,
        "is_tar": res.is_tar,
        "quarantine_fraction": round(qdf.height / res.keys_seen, 6) if res.keys_seen else 0.0,
        "quarantine_reasons": dg.MetadataValue.json(reasons),
        "bytes_images": int(sdf["n_bytes"].sum()) if sdf.height else 0,
        "seconds": round(seconds, 4),
        "samples_per_second": round(res.keys_seen / read_s, 1) if read_s > 0 else 0.0,
        "preview": dg.MetadataValue.md(
            md_table(sdf.select("key", "caption", "width", "height", "format", "uid"))
        ),
        "max_caption_bytes": DEFAULT_MAX_CAPTION_BYTES,
        "caption_policy": "longer captions are quarantined (caption_too_long), never truncated",
        "image_policy": "formats png/jpeg/webp/gif by content; animations: first frame; EXIF orientation applied",
        "orphaned_files_vacuumed": len(_vacuum(db)),
    }
    if qdf.height:
        metadata["quarantine_preview"] = dg.MetadataValue.md(md_table(qdf.select("key", "reason", "detail")))
    for reason, n in reasons.items():
        metadata[f"quarantine_{reason}"] = n
    metadata.update(previews.quarantine_preview(lake, datasets, shard=key) if qdf.height else {})
    return dg.MaterializeResult(metadata=previews.rounded(metadata))


def _vacuum(db) -> list[str]:
    """Remove files no commit references and older than the retention (killed writes' orphans)."""
    removed: list[str] = []
    for table in ("samples", "quarantine"):
        try:
            removed += db.vacuum(table)
        except Exception as e:  # noqa: BLE001 - maintenance must not fail an ingest
            logging.getLogger(__name__).warning("vacuum of %s failed: %s", table, e)
    return removed


def _tombstone(context, db, dataset: str, key: str, path: Path) -> dg.MaterializeResult:
    """The shard file is gone: empty its samples partition, record every key it had as
    ``shard_deleted`` (ingest quarantine), so nothing downstream uses rows whose bytes are gone."""
    old = (
        db.read("samples", columns=["key", "image_sha256"], partitions=[key])
        if db.exists("samples")
        else pl.DataFrame(schema={"key": pl.String, "image_sha256": pl.String})
    )
    keys = old["key"].to_list() or [""]
    shas = dict(zip(old["key"].to_list(), old["image_sha256"].to_list()))
    qdf = pl.DataFrame(
        [
            {
                "dataset": dataset,
                "shard": key,
                "key": k,
                "stage": INGEST_STAGE,
                "reason": "shard_deleted",
                "detail": f"{path.name} was deleted from the landing zone"
                + (f"; image sha256 was {shas[k]}" if k in shas else ""),
            }
            for k in keys
        ],
        schema=QUARANTINE_SCHEMA,
    )
    db.write("samples", pl.DataFrame(schema=SAMPLES_SCHEMA), partition=key)
    db.write("quarantine", qdf, partition=key, where={"stage": INGEST_STAGE})
    context.log.warning("shard %s deleted: tombstoned %d sample rows", key, old.height)
    return dg.MaterializeResult(
        metadata={
            "dataset": dataset,
            "rows": 0,
            "quarantined": qdf.height,
            "keys_seen": qdf.height,
            "tombstoned": old.height,
            "deleted_policy": "tombstone: rows leave `samples`, every key is quarantined as shard_deleted",
            "quarantine_shard_deleted": qdf.height,
        }
    )


ASSETS = [raw_shards, samples]
