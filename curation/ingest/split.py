"""Carve a held-out evaluation split out of a user's own landing dataset.

``curation datasets split DATASET`` holds out either **whole concepts** (every sample whose
metadata column, e.g. ``concept`` or ``label``, has one of the held-out values: zero-shot
on concepts the model never saw) or a **uniform** seeded slice of samples. The held-out
samples are written as an eval set the evaluator reads (``eval/<split>/NNNNN.tar`` +
``manifest.parquet`` + ``tasks.json``; retrieval always, zero-shot over the held-out
concepts when split by concept) and removed from the pool:

* the original shards move to ``<home>/original/<dataset>/`` (outside the landing zone: kept,
  never ingested twice);
* ``landing/<dataset>/`` gets the same shards minus the held-out keys, member for member
  (undecodable or incomplete samples stay, so ingest still quarantines them; nothing is lost).

The manifest's ``uid`` and ``image_sha256`` are what the decontamination check compares. A
second split of the same dataset, or into an existing split folder, is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from curation.ingest.ids import make_uid
from curation.ingest.shard_writer import Record, write_shards
from curation.ingest.shards import (
    IMAGE_EXTS,
    read_json_member,
    shard_key,
    split_member_name,
)

log = logging.getLogger(__name__)

SPLIT_BY = ("concept", "uniform")


@dataclass
class SplitStats:
    dataset: str
    split: str
    by: str
    column: str | None
    pool_samples: int
    eval_samples: int
    eval_concepts: int
    eval_dir: str
    original_dir: str

    def as_dict(self) -> dict:
        return asdict(self)


def _read_groups(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Every key group of a tar, tolerating damage (what could be read)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                f = tf.extractfile(info)
                if f is not None:
                    groups.setdefault(key, {})[ext] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("split: %s ends early (%s); samples after that point stay in the pool", tar, e)
    return list(groups.items())


def _image(group: dict[str, bytes]) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTS:
        if ext in group:
            return ext, group[ext]
    return None


def _filter_tar(src: Path, dst: Path, drop: set[str]) -> int:
    """Copy ``src`` to ``dst`` without the members of the ``drop`` keys; returns members kept."""
    kept = 0
    tmp = dst.with_name(f".{dst.name}.tmp")
    with tarfile.open(src, mode="r|*") as tin, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tout:
        try:
            for info in tin:
                key, _ = split_member_name(info.name)
                if key in drop:
                    continue
                data = tin.extractfile(info) if info.isfile() else None
                tout.addfile(info, io.BytesIO(data.read()) if data is not None else None)
                kept += 1
        except (tarfile.TarError, OSError, EOFError) as e:  # keep a damaged tail out, as ingest would
            log.warning("split: %s ends early (%s)", src, e)
    os.replace(tmp, dst)
    return kept


def split_dataset(
    home: str | os.PathLike,
    dataset: str,
    split: str,
    by: str = "concept",
    column: str | None = "concept",
    fraction: float = 0.1,
    seed: int = 0,
) -> SplitStats:
    """Hold out part of ``landing/<dataset>/`` as the eval set ``eval/<split>/`` (see module doc).

    Args:
        home: the data home (``CURATION_HOME``).
        dataset: a dataset folder of the landing zone.
        split: name of the eval folder to write.
        by: ``concept`` (whole values of ``column``) or ``uniform`` (a seeded slice).
        column: metadata field (``KEY.json`` / shard parquet) naming the concept.
        fraction: target fraction of the samples to hold out, in (0, 1).
        seed: seed of the choice.

    Raises:
        ValueError: unknown ``by``, bad fraction, no such dataset, split exists, dataset
            already split, no sample carries ``column``, or nothing would be held out.
    """
    home = Path(home)
    if by not in SPLIT_BY:
        raise ValueError(f"by: got {by!r}; expected one of {SPLIT_BY}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: got {fraction}; expected 0 < fraction < 1")
    src_dir = home / "landing" / dataset
    tars = sorted(p for p in src_dir.glob("*.tar") if not p.name.startswith((".", "_"))) if src_dir.is_dir() else []
    if not tars:
        have = sorted(p.name for p in (home / "landing").iterdir() if p.is_dir()) if (home / "landing").is_dir() else []
        raise ValueError(f"dataset: got {dataset!r}, which has no shards under {home / 'landing'}; expected one of {have}")
    eval_dir = home / "eval" / split
    if eval_dir.exists():
        raise ValueError(f"split: got {split!r}, but {eval_dir} exists; expected a new split name")
    orig_dir = home / "original" / dataset
    if orig_dir.exists():
        raise ValueError(f"dataset {dataset!r} was already split (originals in {orig_dir}); expected a dataset not split yet")

    # 1. read every sample: key, image, caption, concept
    samples = []  # (shard_key, tar, key, ext, image bytes, caption, concept)
    for tar in tars:
        sk = shard_key(dataset, tar.stem)
        for key, g in _read_groups(tar):
            img = _image(g)
            if img is None or "txt" not in g:
                continue  # stays in the pool; ingest quarantines it
            meta = read_json_member(g["json"]) if "json" in g else {}
            concept = meta.get(column) if column else None
            samples.append((sk, tar, key, img[0], img[1], g["txt"].decode("utf-8", "replace"), None if concept is None else str(concept)))
    if not samples:
        raise ValueError(f"dataset {dataset!r}: got no sample with an image and a caption in {len(tars)} shards")
    rng = np.random.default_rng(seed)
    n = len(samples)
    if by == "uniform":
        k = max(1, int(round(fraction * n)))
        held = set(int(i) for i in rng.choice(n, size=k, replace=False))
        concepts: list[str] = []
    else:
        by_concept: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            if s[6] is not None:
                by_concept[s[6]].append(i)
        if len(by_concept) < 2:
            raise ValueError(
                f"column: got {column!r}, which {'no sample carries' if not by_concept else 'has one value only'} in its KEY.json; "
                "expected a metadata field naming each sample's concept (or use --by uniform)"
            )
        names = sorted(by_concept)
        order = [names[int(i)] for i in rng.permutation(len(names))]
        held, concepts = set(), []
        for c in order:
            if len(held) >= fraction * n or len(concepts) >= len(names) - 1:
                break
            held.update(by_concept[c])
            concepts.append(c)
    if not held:
        raise ValueError(f"nothing to hold out at fraction {fraction}; expected a larger fraction")

    # 2. the eval set
    held_rows = [samples[i] for i in sorted(held)]
    eval_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_eval = eval_dir.with_name(f".{split}.tmp")
    shutil.rmtree(tmp_eval, ignore_errors=True)
    infos = write_shards(
        (Record(key=s[2], image=s[4], ext=s[3], caption=s[5], metadata={"concept": s[6]} if s[6] is not None else {}) for s in held_rows),
        tmp_eval, samples_per_shard=1000, rekey=False,
    )
    tar_of = {}
    for info in infos:
        for row in pl.read_parquet(info.parquet, columns=["key"]).iter_rows():
            tar_of[row[0]] = info.tar.name
    manifest = pl.DataFrame(
        {
            "uid": [make_uid(dataset, s[0], s[2]) for s in held_rows],
            "key": [s[2] for s in held_rows],
            "tar": [tar_of[s[2]] for s in held_rows],
            "member": [f"{s[2]}.{s[3]}" for s in held_rows],
            "caption": [s[5] for s in held_rows],
            "image_sha256": [hashlib.sha256(s[4]).hexdigest() for s in held_rows],
            "concept": [s[6] for s in held_rows],
            "source_shard": [s[0] for s in held_rows],
        }
    )
    manifest.write_parquet(tmp_eval / "manifest.parquet")
    tasks: dict = {
        "split": split,
        "dataset": dataset,
        "samples": manifest.height,
        "by": by,
        "retrieval": {"caption_column": "caption", "image_column": "member"},
        "seed": seed,
        "fraction": fraction,
    }
    if by == "concept":
        tasks["zero_shot"] = {"concept": sorted(concepts)}
    (tmp_eval / "tasks.json").write_text(json.dumps(tasks, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # 3. the pool without the held-out keys; originals kept outside the landing zone
    drop_by_tar: dict[Path, set[str]] = defaultdict(set)
    for s in held_rows:
        drop_by_tar[s[1]].add(s[2])
    orig_dir.mkdir(parents=True)
    for tar in tars:
        orig = orig_dir / tar.name
        shutil.copy2(tar, orig)
        pq = tar.with_suffix(".parquet")
        if pq.exists():
            shutil.copy2(pq, orig_dir / pq.name)
        drop = drop_by_tar.get(tar, set())
        if drop:
            if pq.exists():
                df = pl.read_parquet(pq)
                if "key" in df.columns:
                    df.filter(~pl.col("key").cast(pl.String).is_in(sorted(drop))).write_parquet(pq.with_name(f".{pq.name}.tmp"))
                    os.replace(pq.with_name(f".{pq.name}.tmp"), pq)
            _filter_tar(orig, tar, drop)
    os.replace(tmp_eval, eval_dir)
    stats = SplitStats(dataset, split, by, column if by == "concept" else None, n - len(held), len(held), len(concepts),
                       str(eval_dir), str(orig_dir))
    log.info("split %s: held out %d of %d samples (%d concepts) into %s", dataset, len(held), n, len(concepts), eval_dir)
    return stats
