"""Shard keys and a robust streaming reader for img2dataset-style webdataset shards.

A raw shard is ``landing/<dataset>/<stem>.tar``: members ``KEY.<ext>`` grouped by key
(webdataset convention: the key is the member path up to the first ``.`` of its base name),
with ``KEY.png|jpg|jpeg|webp`` the image, ``KEY.txt`` the caption and ``KEY.json`` metadata;
optionally ``<stem>.parquet`` beside it lists the keys the shard should contain
(img2dataset writes one; rows with a ``status`` other than ``"success"`` are not expected in
the tar and are ignored).

:func:`read_shard` streams the tar once (one key group in memory at a time) and turns every
distinct key it sees into exactly one row: a ``samples`` row (schema in
``docs/architecture.md``) or a ``quarantine`` row with stage ``"ingest"`` and one of
:data:`REASONS`. Bad input never raises and nothing is dropped silently:

* a truncated tar keeps what was read completely; the key group being read when the data ran
  out, and every key the parquet manifest lists but the tar never delivered, is
  ``truncated_tar``;
* a file that is not a tar yields ``not_a_tar`` for every manifest key (or one row with
  ``key=""`` standing for the whole file when there is no manifest);
* images are checked for their pixel count from the header only (``decompression_bomb``)
  before they are decoded, then fully decoded (``corrupt_image``);
* member names that are absolute, contain ``..``, or are links are never used as paths
  (``unsafe_member_name``); a key that occurs twice in a shard is ``duplicate_key`` (all its
  copies, since it is ambiguous which one is right).

The reader is deterministic: the same bytes give the same rows in the same order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import polars as pl
from PIL import Image

from curation.ingest.ids import make_uid

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
METADATA_EXT = "json"
INGEST_STAGE = "ingest"

#: Quarantine reason codes of the ingest stage.
REASONS = (
    "truncated_tar",
    "not_a_tar",
    "empty_member",
    "corrupt_image",
    "decompression_bomb",
    "missing_caption",
    "empty_caption",
    "missing_image",
    "multiple_images",
    "invalid_utf8_caption",
    "unsafe_member_name",
    "duplicate_key",
    "missing_from_tar",
)

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String,
    "dataset": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "caption": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "format": pl.String,
    "image_sha256": pl.String,
    "n_bytes": pl.Int64,
    "member": pl.String,
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "stage": pl.String,
    "reason": pl.String,
    "detail": pl.String,
}

_DATASET_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_STEM_RE = re.compile(r"^[A-Za-z0-9_.]+$")


# --------------------------------------------------------------------------- shard keys


def shard_key(dataset: str, stem: str) -> str:
    """Partition key of ``landing/<dataset>/<stem>.tar``: ``"<dataset>-<stem>"``.

    Raises:
        ValueError: if ``stem`` contains ``-`` (the key would not parse back) or either part
            has characters outside ``[A-Za-z0-9_.]`` (plus ``-`` in the dataset).
    """
    if not _DATASET_RE.match(dataset or ""):
        raise ValueError(f"dataset: got {dataset!r}; expected letters, digits, '_', '.', '-'")
    if not _STEM_RE.match(stem or ""):
        raise ValueError(f"shard stem: got {stem!r}; expected letters, digits, '_', '.' (no '-')")
    return f"{dataset}-{stem}"


def parse_shard_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`shard_key`: ``"emoji-00003"`` -> ``("emoji", "00003")``."""
    dataset, sep, stem = key.rpartition("-")
    if not sep or not dataset or not stem:
        raise ValueError(f"shard key: got {key!r}; expected '<dataset>-<stem>'")
    shard_key(dataset, stem)  # validates both parts
    return dataset, stem


def shard_path(landing: str | os.PathLike, key: str) -> Path:
    """``landing/<dataset>/<stem>.tar`` of a shard key."""
    dataset, stem = parse_shard_key(key)
    return Path(landing) / dataset / f"{stem}.tar"


def find_shards(landing: str | os.PathLike) -> dict[str, Path]:
    """Scan ``landing/<dataset>/<stem>.tar`` and return ``{shard_key: path}`` sorted by key.

    Hidden or in-progress files (names starting with ``.`` or ``_``) are ignored; files
    whose names cannot form a key are skipped with a warning. A missing landing dir is empty.
    """
    root = Path(landing)
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for tar in sorted(ds_dir.glob("*.tar")):
            if tar.name.startswith((".", "_")) or not tar.is_file():
                continue
            try:
                out[shard_key(ds_dir.name, tar.stem)] = tar
            except ValueError as e:
                log.warning("skipping landing file %s: %s", tar, e)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- members


def split_member_name(name: str) -> tuple[str, str]:
    """Webdataset split of a member name into ``(key, ext)``: ``"a/b.seg.png"`` -> ``("a/b", "seg.png")``."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (ext.lower() if dot else "")


def unsafe_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member must not be used (absolute path, ``..``, link, device), else ``None``."""
    name = info.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "path contains '..'"
    if "\x00" in name:
        return "NUL in name"
    if info.issym() or info.islnk():
        return f"link member -> {info.linkname!r}"
    if not (info.isfile() or info.isdir()):
        return "special file member"
    return None


def _read_manifest_keys(parquet: Path) -> list[str] | None:
    """Keys an img2dataset-style ``<stem>.parquet`` says the tar holds (status success), or None."""
    if not parquet.is_file():
        return None
    try:
        df = pl.read_parquet(parquet)
    except Exception as e:  # a broken side-car must not stop ingestion of the tar itself
        log.warning("ignoring unreadable shard manifest %s: %s", parquet, e)
        return None
    if "key" not in df.columns:
        return None
    if "status" in df.columns:
        df = df.filter(pl.col("status") == "success")
    return [str(k) for k in df["key"].to_list()]


# --------------------------------------------------------------------------- reader


@dataclass
class ShardReadResult:
    """Output of :func:`read_shard`.

    Attributes:
        samples: rows with the keys of :data:`SAMPLES_SCHEMA`, in tar order.
        quarantine: rows with the keys of :data:`QUARANTINE_SCHEMA` (stage ``"ingest"``).
        keys_seen: distinct keys seen (tar members plus manifest keys); equals
            ``len(samples) + len(quarantine)``.
        members: tar members read (files, including unusable ones).
        truncated: whether the tar ended before its end-of-archive marker.
        is_tar: False when the file could not be opened as a tar at all.
    """

    samples: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    keys_seen: int = 0
    members: int = 0
    truncated: bool = False
    is_tar: bool = True

    def reasons(self) -> dict[str, int]:
        """Quarantine counts per reason code, sorted by reason."""
        return dict(sorted(Counter(r["reason"] for r in self.quarantine).items()))

    def samples_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.samples, schema=SAMPLES_SCHEMA)

    def quarantine_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.quarantine, schema=QUARANTINE_SCHEMA)


@dataclass
class _Group:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # ext -> bytes
    names: dict[str, str] = field(default_factory=dict)  # ext -> member name
    problem: tuple[str, str] | None = None  # first (reason, detail) found while reading


class _Truncated(Exception):
    """The stream ended early; ``name`` is the member whose data was cut (None: a header)."""

    def __init__(self, detail: str, name: str | None = None):
        super().__init__(detail)
        self.name = name


# what a damaged stream raises (tarfile, the decompressors, a short read)
_STREAM_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _iter_members(tf: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, bytes | None, str | None]]:
    """Yield ``(info, data, unsafe_reason)``; data is None for unsafe or non-file members.

    Raises:
        _Truncated: when the stream ends inside a header or a member's data.
    """
    while True:
        try:
            info = tf.next()
        except _STREAM_ERRORS as e:
            raise _Truncated(f"header after byte {tf.offset}: {e}") from e
        if info is None:
            return
        bad = unsafe_reason(info)
        if bad is not None:
            yield info, None, bad
            continue
        if not info.isfile():
            continue  # directories carry no sample
        try:
            f = tf.extractfile(info)
            data = f.read() if f is not None else b""
        except _STREAM_ERRORS as e:
            raise _Truncated(f"member {info.name!r}: {e}", info.name) from e
        if len(data) != info.size:
            raise _Truncated(f"member {info.name!r}: got {len(data)} of {info.size} bytes", info.name)
        yield info, data, None


def _has_end_marker(tf: tarfile.TarFile, path: Path) -> bool:
    """True if an uncompressed tar has its end-of-archive zero block where the members end.

    Members that end exactly where the file is cut leave no error in tarfile's stream mode;
    the missing end-of-archive block is what tells a truncated tar from a complete one.
    Compressed tars (gzip etc.) are checked by their decompressor instead.
    """
    if getattr(tf.fileobj, "comptype", "tar") != "tar":
        return True
    with open(path, "rb") as f:
        f.seek(tf.offset)
        block = f.read(512)
    return len(block) == 512 and block == b"\x00" * 512


def _image_info(data: bytes, max_pixels: int) -> tuple[int, int, str] | tuple[str, str]:
    """``(width, height, format)`` of a decodable image, or ``(reason, detail)``.

    The pixel count is checked from the header before any pixel data is decoded.
    """
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before decoding
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                fmt = (img.format or "").lower()
                if w * h > max_pixels:
                    return "decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}"
                if w <= 0 or h <= 0:
                    return "corrupt_image", f"invalid size {w}x{h}"
                img.load()
        return w, h, fmt
    except Image.DecompressionBombError as e:
        return "decompression_bomb", str(e)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        return "corrupt_image", f"{type(e).__name__}: {e}"
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _finish_group(
    g: _Group, dataset: str, shard: str, max_pixels: int
) -> tuple[str, dict]:
    """Turn a complete key group into ``("sample", row)`` or ``("quarantine", row)``."""

    def q(reason: str, detail: str) -> tuple[str, dict]:
        return "quarantine", {
            "dataset": dataset,
            "shard": shard,
            "key": g.key,
            "stage": INGEST_STAGE,
            "reason": reason,
            "detail": detail,
        }

    if g.problem is not None:
        return q(*g.problem)
    image_exts = [e for e in g.members if e in IMAGE_EXTS]
    if not image_exts:
        return q("missing_image", f"members: {sorted(g.names.values())}")
    if len(image_exts) > 1:
        return q("multiple_images", f"image members: {sorted(g.names[e] for e in image_exts)}")
    img_ext = image_exts[0]
    img = g.members[img_ext]
    if len(img) == 0:
        return q("empty_member", f"{g.names[img_ext]} has 0 bytes")
    if CAPTION_EXT not in g.members:
        return q("missing_caption", f"no {g.key}.{CAPTION_EXT}")
    raw_caption = g.members[CAPTION_EXT]
    if len(raw_caption) == 0:
        return q("empty_member", f"{g.names[CAPTION_EXT]} has 0 bytes")
    try:
        caption = raw_caption.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return q("invalid_utf8_caption", str(e))
    if not caption:
        return q("empty_caption", "caption is whitespace only")
    info = _image_info(img, max_pixels)
    if len(info) == 2:
        return q(*info)
    w, h, fmt = info
    return "sample", {
        "uid": make_uid(dataset, shard, g.key),
        "dataset": dataset,
        "shard": shard,
        "key": g.key,
        "caption": caption,
        "width": w,
        "height": h,
        "format": fmt,
        "image_sha256": hashlib.sha256(img).hexdigest(),
        "n_bytes": len(img),
        "member": g.names[img_ext],
    }


def read_shard(
    path: str | os.PathLike,
    dataset: str,
    shard_key: str,
    max_pixels: int = 40_000_000,
    manifest: str | os.PathLike | None | bool = True,
) -> ShardReadResult:
    """Read one raw shard into sample rows and ingest-quarantine rows (never raises on bad data).

    Args:
        path: the ``.tar`` (plain or compressed; read as a stream).
        dataset: dataset name written to the rows and into the uid.
        shard_key: the shard's partition key (``"<dataset>-<stem>"``), the ``shard`` column.
        max_pixels: images with ``width * height`` above this are ``decompression_bomb``
            (checked from the header, before decoding).
        manifest: ``True`` uses ``<stem>.parquet`` beside the tar when present, ``False``
            ignores it, a path names it explicitly.

    Returns:
        A :class:`ShardReadResult`; every distinct key seen is in exactly one of
        ``samples`` / ``quarantine``.

    Raises:
        FileNotFoundError: if ``path`` does not exist (a missing file is not bad data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {shard_key!r}: {path} does not exist")
    res = ShardReadResult()
    if manifest is True:
        manifest_keys = _read_manifest_keys(path.with_suffix(".parquet"))
    elif manifest:
        manifest_keys = _read_manifest_keys(Path(manifest))
    else:
        manifest_keys = None

    # key -> ("sample"|"quarantine", index into that list); used to detect repeats.
    placed: dict[str, tuple[str, int]] = {}
    duplicates: dict[str, int] = {}

    def quarantine_row(key: str, reason: str, detail: str) -> dict:
        return {
            "dataset": dataset,
            "shard": shard_key,
            "key": key,
            "stage": INGEST_STAGE,
            "reason": reason,
            "detail": detail,
        }

    def place(kind: str, row: dict) -> None:
        key = row["key"]
        if key in placed:
            duplicates[key] = duplicates.get(key, 1) + 1
            return
        lst = res.samples if kind == "sample" else res.quarantine
        placed[key] = (kind, len(lst))
        lst.append(row)

    current: _Group | None = None
    try:
        tf = tarfile.open(path, mode="r|*")
    except _STREAM_ERRORS as e:
        res.is_tar = False
        detail = f"{path.name} is not a readable tar: {e}"
        log.warning("%s", detail)
        for key in manifest_keys if manifest_keys else [""]:
            if key not in placed:
                place("quarantine", quarantine_row(key, "not_a_tar", detail))
        res.keys_seen = len(placed)
        return res

    trunc_detail = ""
    with tf:
        try:
            for info, data, bad in _iter_members(tf):
                key, ext = split_member_name(info.name)
                if info.isfile() or bad is not None:
                    res.members += 1
                if bad is not None:
                    # never use the name as a path; record the key as written
                    if current is not None and current.key != key:
                        place(*_finish_group(current, dataset, shard_key, max_pixels))
                        current = None
                    if current is None:
                        current = _Group(key)
                    if current.problem is None:
                        current.problem = ("unsafe_member_name", f"{info.name!r}: {bad}")
                    continue
                if current is not None and current.key != key:
                    place(*_finish_group(current, dataset, shard_key, max_pixels))
                    current = None
                if current is None:
                    current = _Group(key)
                if ext in current.members:
                    if current.problem is None:
                        current.problem = ("duplicate_key", f"member {info.name!r} occurs twice")
                    continue
                current.members[ext] = data
                current.names[ext] = info.name
                if len(data) == 0 and ext != METADATA_EXT and current.problem is None:
                    current.problem = ("empty_member", f"{info.name} has 0 bytes")
            if not _has_end_marker(tf, path):
                raise _Truncated(f"no end-of-archive block after byte {tf.offset}")
            if current is not None:
                place(*_finish_group(current, dataset, shard_key, max_pixels))
                current = None
        except _Truncated as e:
            res.truncated = True
            trunc_detail = str(e)
            cut_key = split_member_name(e.name)[0] if e.name is not None else None
            if current is not None and current.key != cut_key:
                # the last group before the cut: keep it if it is usable as read (only an
                # optional member such as the .json can be missing), else it is truncated
                usable = current.problem is not None or (
                    CAPTION_EXT in current.members and any(x in IMAGE_EXTS for x in current.members)
                )
                if usable:
                    place(*_finish_group(current, dataset, shard_key, max_pixels))
                else:
                    place("quarantine", quarantine_row(current.key, "truncated_tar", f"incomplete key group: {e}"))
                current = None
            if cut_key is not None:
                # the member whose data was cut: its key group is incomplete
                place("quarantine", quarantine_row(cut_key, "truncated_tar", f"incomplete key group: {e}"))
                current = None
    if res.truncated:
        log.warning("%s is truncated: %s", path, trunc_detail)

    # a key seen twice: every copy is ambiguous, so the key goes to quarantine as a whole
    for key, n in duplicates.items():
        kind, idx = placed[key]
        detail = f"key occurs {n} times in the shard"
        row = quarantine_row(key, "duplicate_key", detail)
        if kind == "sample":
            res.samples[idx] = None  # type: ignore[call-overload]
            placed[key] = ("quarantine", len(res.quarantine))
            res.quarantine.append(row)
        else:
            res.quarantine[idx] = row
    res.samples = [r for r in res.samples if r is not None]

    for key in manifest_keys or []:
        if key not in placed:
            reason = "truncated_tar" if res.truncated else "missing_from_tar"
            detail = trunc_detail if res.truncated else "listed in the shard parquet but not in the tar"
            place("quarantine", quarantine_row(key, reason, detail))
    res.keys_seen = len(placed)
    return res


def list_keys(path: str | os.PathLike, manifest: bool = True) -> set[str]:
    """Distinct keys a shard holds, from member names only (no decoding): tar keys plus
    manifest keys; ``{""}`` for a file that is not a tar and has no manifest.

    An independent count for the ingest check (samples + quarantine == keys seen).
    """
    path = Path(path)
    keys: set[str] = set()
    if manifest:
        keys.update(_read_manifest_keys(path.with_suffix(".parquet")) or [])
    try:
        tf = tarfile.open(path, mode="r|*")
    except _STREAM_ERRORS:
        return keys or {""}
    with tf:
        try:
            while True:
                info = tf.next()
                if info is None:
                    break
                if info.isdir() and unsafe_reason(info) is None:
                    continue
                keys.add(split_member_name(info.name)[0])
        except _STREAM_ERRORS:
            pass
    return keys


def load_members(path: str | os.PathLike, names: Iterable[str]) -> dict[str, bytes]:
    """Bytes of the named members of a tar, in one streaming pass.

    Stops as soon as every name was found. Names not present (or unsafe, or beyond a
    truncation point) are simply absent from the result; the caller decides what that means.
    """
    wanted = set(names)
    out: dict[str, bytes] = {}
    if not wanted:
        return out
    try:
        tf = tarfile.open(path, mode="r|*")
    except _STREAM_ERRORS as e:
        log.warning("cannot open %s as a tar: %s", path, e)
        return out
    with tf:
        try:
            for info, data, bad in _iter_members(tf):
                if bad is None and info.name in wanted and info.name not in out:
                    out[info.name] = data  # type: ignore[assignment]
                    if len(out) == len(wanted):
                        break
        except _Truncated as e:
            log.warning("%s is truncated: %s", path, e)
    return out


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` key groups of a well-formed tar in order (writer tests, exports)."""
    tf = tarfile.open(path, mode="r|*")
    current_key, group = None, {}
    with tf:
        for info, data, bad in _iter_members(tf):
            if bad is not None:
                continue
            key, ext = split_member_name(info.name)
            if current_key is not None and key != current_key:
                yield current_key, group
                group = {}
            current_key = key
            group[ext] = data  # type: ignore[assignment]
    if current_key is not None:
        yield current_key, group


def read_json_member(data: bytes) -> dict:
    """Parse a ``KEY.json`` member (``{}`` when it is not a JSON object)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
