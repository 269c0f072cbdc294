"""Subset exports that existing trainers read directly (docs/architecture.md, "Subset exports").

``export_subset`` writes, under ``out_dir`` (``artifacts/subsets/<recipe>/``):

* ``uids.npy``: the kept uids as a sorted ``(n, 2) uint64`` array (DataComp's subset file);
* ``manifest.parquet``: uid, shard, key, caption, rank, score (sorted by rank);
* ``shards/NNNNN.tar``: webdataset shards of ONLY the kept samples, image bytes copied
  unchanged from the source shards, keyed by uid (``<uid>.<png|jpg|webp>``, ``<uid>.txt``,
  ``<uid>.json``), so ``open_clip``'s trainer (``--train-data 'shards/{00000..0000N}.tar'``)
  and ``webdataset`` read them as-is;
* ``recipe.json``: the resolved recipe, its hash, and the counts.

Source shards are streamed once each (:func:`curation.ingest.shards.load_members`); output tars
are written by the platform's one atomic writer (:class:`curation.ingest.shards.AtomicTarWriter`:
hidden temp name, rename on success, fixed member metadata), so an export is byte-reproducible
and a killed export never leaves a partial ``NNNNN.tar``. Every copied image is checked against
the ``image_sha256`` recorded at ingest (when the samples carry it): bytes that changed since
ingest are not exported (``changed_uids`` in recipe.json), like bytes that are gone
(``missing_uids``). Paths stay inside ``out_dir`` (:func:`curation.storage.data_home.safe_child`).
A re-export replaces the previous files of the same directory; stale shards are removed only
after the new ones are in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.engine.executor import run_beside
from curation.ingest.ids import sorted_uid_array
from curation.ingest.shards import AtomicTarWriter, load_members, shard_path
from curation.storage.data_home import safe_child
from curation.storage.lake import release_memory

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("uid", "dataset", "shard", "key", "caption", "member")
MANIFEST_COLUMNS = ("uid", "shard", "key", "caption", "rank", "score")
#: the samples columns an export without webdataset shards needs (the manifest's)
MANIFEST_SAMPLE_COLUMNS = ("uid", "shard", "key", "caption")
#: zstd level of manifest.parquet: level 1 wrote a 515k-row manifest in 0.10 s against 0.18 s
#: at polars' default level, and the file came out no larger (14 vs 15 MiB)
MANIFEST_ZSTD_LEVEL = 1


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (readers never see a partial file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def kept_in_pool_order(pool_uids: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The kept uids (``Selection.index``: their rows in the pool whose uids are ``pool_uids``)
    in pool row order, for :func:`export_subset`'s ``kept_uids``: a pool read sorted by uid
    (:func:`curation.select.pool_tables.read_recipe_pool`) gives them in the uid file's order,
    which then needs no sort (560k kept of a 1.12M pool: the file's uids in 0.05 s, not 0.14)."""
    keep = np.zeros(len(pool_uids), bool)
    keep[np.asarray(index, dtype=np.int64)] = True
    return np.asarray(pool_uids)[np.flatnonzero(keep)]


def export_subset(
    out_dir: str | Path,
    selection: pl.DataFrame,
    samples: pl.DataFrame,
    landing: str | Path,
    recipe: dict[str, Any] | None = None,
    shard_size: int = 10_000,
    write_shards: bool = True,
    extra: dict[str, Any] | None = None,
    kept_uids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write the exports of one subset.

    Args:
        out_dir: destination directory (created; previous export files replaced).
        selection: columns uid, rank, score (the ``subsets`` rows of the recipe).
        samples: the ``samples`` rows of every kept uid (``SAMPLE_COLUMNS``, and
            ``image_sha256`` to check copied bytes; without shards ``MANIFEST_SAMPLE_COLUMNS``
            suffice), e.g. from :func:`curation.select.pool_tables.read_kept_samples` (which
            streams the table); pass it inline and it is freed once the manifest is joined.
        landing: the landing root holding ``<dataset>/<stem>.tar``.
        recipe: the resolved recipe, stored under ``"recipe"`` in ``recipe.json``.
        shard_size: kept samples per output shard.
        write_shards: also write the webdataset shards (the uid file and manifest always).
        extra: more top-level keys for ``recipe.json`` (recipe hash, pool counts, ...).
        kept_uids: the selection's uids again, in any order, to make ``uids.npy`` from; in uid
            order (:func:`kept_in_pool_order` of a pool read sorted by uid) the file needs no
            sort. Default: the selection's own, in rank order.

    Returns:
        Stats: ``n`` (kept samples), ``n_shards``, ``n_missing`` (kept samples whose image
        could not be read back from the source shard, or whose bytes no longer match the
        ``image_sha256`` of ingest; listed in recipe.json as ``missing_uids`` and
        ``changed_uids``), ``n_changed``, ``bytes`` (image bytes copied), ``paths``.

    Raises:
        ValueError: if a selected uid has no ``samples`` row, or ``kept_uids`` is not as many
            uids as the selection.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size: got {shard_size}; expected >= 1")
    if kept_uids is not None and len(kept_uids) != selection.height:
        raise ValueError(f"kept_uids: got {len(kept_uids)} uids for a selection of {selection.height}; expected the same uids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    need = SAMPLE_COLUMNS if write_shards else MANIFEST_SAMPLE_COLUMNS
    missing_cols = sorted(set(need) - set(samples.columns))
    if missing_cols:
        raise ValueError(f"samples: got no columns {missing_cols}; expected {list(need)}")
    has_sha = "image_sha256" in samples.columns and write_shards
    sel = selection.select("uid", "rank", "score")
    # in the selection's order (a Selection's frame is in rank order already: no sort, no copy);
    # samples already in that order (read_kept_samples) are put beside it, not joined
    rows = samples.select([*need, *(["image_sha256"] if has_sha else [])])
    if rows.height == sel.height and rows["uid"].equals(sel["uid"]):
        man = sel.hstack(rows.drop("uid"))
    else:
        man = sel.join(rows, on="uid", how="left", maintain_order="left")
    del rows
    del samples, sel  # the manifest carries what follows (a caller passing its frame inline frees it here)
    if not man["rank"].is_sorted():
        man = man.sort("rank")
    unknown = man.filter(pl.col("shard").is_null())["uid"].head(3).to_list()
    if unknown:
        n_unknown = int(man["shard"].null_count())
        raise ValueError(f"selection: got {n_unknown} uids without a samples row (e.g. {unknown}); expected all kept uids in samples")

    def save_uids(p: Path) -> None:
        with open(p, "wb") as f:  # from an array or the column: no Python string per uid
            np.save(f, sorted_uid_array(man["uid"] if kept_uids is None else kept_uids))

    # the manifest is written (polars, GIL released) while the uid file is made and saved
    # (500k kept: 0.11 s and 0.09 s one after the other)
    run_beside(lambda: _write_atomic(out / "manifest.parquet", lambda p: man.select(MANIFEST_COLUMNS).write_parquet(
                   p, compression="zstd", compression_level=MANIFEST_ZSTD_LEVEL)),
               lambda: _write_atomic(out / "uids.npy", save_uids))

    shards_dir = safe_child(out, "shards")
    shards_dir.mkdir(exist_ok=True)
    # only the shards check image bytes against ingest's sha256 (a dict of every kept uid otherwise costs ~0.5 s at 500k)
    sha_of = dict(zip(man["uid"].to_list(), man["image_sha256"].to_list())) if has_sha else {}
    n_shards, n_bytes, missing, changed = 0, 0, [], []
    if write_shards and man.height:
        # Stream each source shard once: output order is (source shard, key).
        ordered = man.sort(["shard", "key"])
        writer: AtomicTarWriter | None = None
        in_shard = 0
        for (shard,), group in ordered.group_by(["shard"], maintain_order=True):
            members = group["member"].to_list()
            blobs = load_members(shard_path(landing, shard), members)
            for row in group.iter_rows(named=True):
                data = blobs.get(row["member"])
                if data is None:
                    missing.append(row["uid"])
                    continue
                want = sha_of.get(row["uid"])
                if want and hashlib.sha256(data).hexdigest() != want:
                    changed.append(row["uid"])  # replaced since ingest: not the sample we scored
                    continue
                if writer is None or in_shard >= shard_size:
                    if writer is not None:
                        writer.commit()
                    writer = AtomicTarWriter(shards_dir / f"{n_shards:05d}.tar")
                    n_shards += 1
                    in_shard = 0
                ext = row["member"].rsplit(".", 1)[-1].lower()
                uid = row["uid"]
                meta = {
                    "uid": uid,
                    "shard": shard,
                    "key": row["key"],
                    "caption": row["caption"],
                    "rank": int(row["rank"]),
                    "score": float(row["score"]),
                }
                writer.add(f"{uid}.{ext}", data)
                writer.add(f"{uid}.txt", (row["caption"] or "").encode("utf-8"))
                writer.add(f"{uid}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                in_shard += 1
                n_bytes += len(data)
        if writer is not None:
            writer.commit()
    keep = {f"{i:05d}.tar" for i in range(n_shards)}
    for old in shards_dir.glob("*.tar"):
        if old.name not in keep:
            old.unlink()
    if missing:
        log.warning("export %s: %d kept samples could not be read from their source shards", out, len(missing))
    if changed:
        log.warning(
            "export %s: %d kept samples changed since ingest (sha256 differs); not exported: re-ingest the shards",
            out, len(changed),
        )
    n_rows = man.height
    info = {
        **(extra or {}),
        "recipe": recipe or {},
        "n": n_rows,
        "n_shards": n_shards,
        "n_missing": len(missing) + len(changed),
        "missing_uids": missing,
        "changed_uids": changed,
        "shard_size": shard_size,
    }
    del man
    release_memory()
    text = json.dumps(info, indent=2, sort_keys=True, default=str)
    _write_atomic(out / "recipe.json", lambda p: p.write_text(text))
    paths = [str(out / "uids.npy"), str(out / "manifest.parquet"), str(out / "recipe.json")]
    paths += [str(shards_dir / f"{i:05d}.tar") for i in range(n_shards)]
    return {
        "n": n_rows,
        "n_shards": n_shards,
        "n_missing": len(missing) + len(changed),
        "n_changed": len(changed),
        "bytes": n_bytes,
        "paths": paths,
    }
