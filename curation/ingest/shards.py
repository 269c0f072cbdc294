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

import contextlib
import hashlib
import io
import json
import logging
import lzma
import os
import re
import tarfile
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import polars as pl

from curation.ingest.ids import make_uid
from curation.ingest.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    IMAGE_EXTS,
    ImageRejected,
    describe_error,
    open_image,
)

log = logging.getLogger(__name__)

CAPTION_EXT = "txt"
#: captions longer than this many UTF-8 bytes are quarantined (``caption_too_long``), not
#: truncated: a multi-kilobyte "caption" is a scraped page body, not alt text, and silently
#: cutting it would store a text nobody wrote. 16 KiB is ~50x the longest LAION alt texts.
DEFAULT_MAX_CAPTION_BYTES = 16_384
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
    "unsupported_format",
    "format_mismatch",
    "extreme_aspect_ratio",
    "caption_too_long",
    "unreadable_manifest",
    "empty_shard",
    "shard_deleted",
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


def normalize_member_name(name: str) -> str:
    """The canonical form of a member name: ``\\`` -> ``/``, ``.`` and empty segments dropped,
    Unicode NFC. ``"./a/./b.png"`` and ``"a/b.png"`` (or a decomposed and a composed ``é``) are
    the same name, so they give the same key (and collide as ``duplicate_key``)."""
    n = unicodedata.normalize("NFC", name.replace("\\", "/"))
    lead = "/" if n.startswith("/") else ""  # an absolute name stays visibly absolute
    return lead + "/".join(p for p in n.split("/") if p not in ("", "."))


def split_member_name(name: str) -> tuple[str, str]:
    """Webdataset split of a (normalized) member name into ``(key, ext)``: ``"./a/b.seg.png"`` -> ``("a/b", "seg.png")``."""
    head, _, base = normalize_member_name(name).rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (ext.lower() if dot else "")


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def unsafe_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member must not be used (absolute path, ``..``, control characters, link,
    device), else ``None``."""
    name = info.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "path contains '..'"
    if "\x00" in name:
        return "NUL in name"
    if _CONTROL_RE.search(name):
        return "control character in name"
    if info.issym() or info.islnk():
        return f"link member -> {info.linkname!r}"
    if not (info.isfile() or info.isdir()):
        return "special file member"
    return None


@dataclass
class _Manifest:
    """What a ``<stem>.parquet`` side-car says: the expected keys, or why it could not be used."""

    keys: list[str] | None = None  # None: no usable manifest
    int_keys: bool = False  # the key column is integer-typed (matched to tar keys by value)
    error: str | None = None  # the side-car exists but is unusable


def _read_manifest(parquet: Path) -> _Manifest:
    """Keys an img2dataset-style ``<stem>.parquet`` says the tar holds (status success).

    An integer ``key`` column (some writers store ``000000123`` as 123) is kept as integers'
    decimal strings and matched to tar keys by numeric value (:func:`_match_int_keys`). A
    side-car that exists but cannot be read or has no ``key`` column is reported in ``error``
    (the reader turns it into an ``unreadable_manifest`` quarantine row, key ``""``).
    """
    if not parquet.is_file():
        return _Manifest()
    try:
        df = pl.read_parquet(parquet)
    except Exception as e:  # noqa: BLE001 - a broken side-car must not stop ingestion of the tar itself
        return _Manifest(error=f"{parquet.name} is unreadable: {describe_error(e)}")
    if "key" not in df.columns:
        return _Manifest(error=f"{parquet.name} has no 'key' column (columns: {df.columns[:10]})")
    if "status" in df.columns:
        df = df.filter(pl.col("status") == "success")
    int_keys = df.schema["key"].is_integer()
    keys = [str(k) for k in df["key"].to_list() if k is not None]
    return _Manifest(keys=keys, int_keys=int_keys)


def _match_int_keys(manifest_keys: Iterable[str], tar_keys: Iterable[str]) -> list[str]:
    """Map integer manifest keys (``"123"``) to the zero-padded tar key with that value (``"000000123"``)."""
    by_value: dict[int, str] = {}
    for k in tar_keys:
        if k.isdigit():
            by_value.setdefault(int(k), k)
    return [by_value.get(int(k), k) for k in manifest_keys]


def _read_manifest_keys(parquet: Path) -> list[str] | None:
    """Keys of a usable side-car, else None (see :func:`_read_manifest`)."""
    return _read_manifest(parquet).keys


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


def _image_info(
    data: bytes, ext: str, max_pixels: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
) -> tuple[int, int, str, int] | tuple[str, str]:
    """``(width, height, format, frames)`` of an acceptable image, or ``(reason, detail)``.

    Delegates to :func:`curation.ingest.images.open_image` (allowlist, bounds from the header,
    full decode, EXIF orientation): the ingest stage and the embed stage agree on what an image is.
    """
    try:
        im = open_image(data, ext, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    except ImageRejected as e:
        return e.reason, e.detail
    return im.width, im.height, im.format, im.frames


_CAPTION_JUNK_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_caption(raw: bytes) -> str:
    """Decode a caption (UTF-8, raises ``UnicodeDecodeError``), drop control characters other
    than tab/newline (NUL, bell, ...), normalize to NFC and strip surrounding whitespace."""
    text = raw.decode("utf-8")
    text = _CAPTION_JUNK_RE.sub("", text)
    return unicodedata.normalize("NFC", text).strip()


def _finish_group(
    g: _Group,
    dataset: str,
    shard: str,
    max_pixels: int,
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
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
    if len(raw_caption) > max_caption_bytes:
        return q("caption_too_long", f"{len(raw_caption)} bytes > max_caption_bytes {max_caption_bytes}")
    try:
        caption = clean_caption(raw_caption)
    except UnicodeDecodeError as e:
        return q("invalid_utf8_caption", str(e))
    if not caption:
        return q("empty_caption", "caption is empty after removing whitespace and control characters")
    info = _image_info(img, img_ext, max_pixels, max_aspect_ratio)
    if len(info) == 2:
        return q(*info)
    w, h, fmt, _frames = info
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
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
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
        max_caption_bytes: longer captions are ``caption_too_long`` (quarantined, not truncated).
        max_aspect_ratio: images with ``max(w, h) / min(w, h)`` above this are ``extreme_aspect_ratio``.

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
        man = _read_manifest(path.with_suffix(".parquet"))
    elif manifest:
        man = _read_manifest(Path(manifest))
    else:
        man = _Manifest()
    manifest_keys = man.keys

    def finish(g: _Group) -> tuple[str, dict]:
        return _finish_group(g, dataset, shard_key, max_pixels, max_caption_bytes, max_aspect_ratio)

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
        if man.error is not None and "" not in placed:
            place("quarantine", quarantine_row("", "unreadable_manifest", man.error))
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
                        place(*finish(current))
                        current = None
                    if current is None:
                        current = _Group(key)
                    if current.problem is None:
                        current.problem = ("unsafe_member_name", f"{info.name!r}: {bad}")
                    continue
                if current is not None and current.key != key:
                    place(*finish(current))
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
                place(*finish(current))
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
                    place(*finish(current))
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

    if man.int_keys and manifest_keys:
        manifest_keys = _match_int_keys(manifest_keys, placed)
    for key in manifest_keys or []:
        if key not in placed:
            reason = "truncated_tar" if res.truncated else "missing_from_tar"
            detail = trunc_detail if res.truncated else "listed in the shard parquet but not in the tar"
            place("quarantine", quarantine_row(key, reason, detail))
    # whole-file problems are one row with key "" (no sample key can be empty)
    if man.error is not None:
        log.warning("shard %s: %s", shard_key, man.error)
        place("quarantine", quarantine_row("", "unreadable_manifest", man.error))
    if not placed:
        place("quarantine", quarantine_row("", "empty_shard", f"{path.name} holds no members"))
    res.keys_seen = len(placed)
    return res


def list_keys(path: str | os.PathLike, manifest: bool = True) -> set[str]:
    """Distinct keys a shard holds, from member names only (no decoding): tar keys plus
    manifest keys, plus ``""`` standing for a whole-file row (a file that is not a tar and
    has no manifest, an empty tar, an unreadable side-car).

    An independent count for the ingest check (samples + quarantine == keys seen).
    """
    path = Path(path)
    keys: set[str] = set()
    man = _read_manifest(path.with_suffix(".parquet")) if manifest else _Manifest()
    if man.error is not None:
        keys.add("")
    tar_keys: set[str] = set()
    try:
        tf = tarfile.open(path, mode="r|*")
    except _STREAM_ERRORS:
        return keys | set(man.keys or []) or {""}
    with tf:
        try:
            while True:
                info = tf.next()
                if info is None:
                    break
                if info.isdir() and unsafe_reason(info) is None:
                    continue
                tar_keys.add(split_member_name(info.name)[0])
        except _STREAM_ERRORS:
            pass
    mkeys = man.keys or []
    if man.int_keys:
        mkeys = _match_int_keys(mkeys, tar_keys)
    keys |= tar_keys | set(mkeys)
    return keys or {""}


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


def iter_samples(path: str | os.PathLike, strict: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` key groups of a tar in order: the public reader of
    webdataset shards for every consumer (exports, training, evaluation).

    Member names are validated as in :func:`read_shard`: absolute names, ``..``, control
    characters, links and special files are skipped (with a warning) and never used as
    paths; keys are normalized (:func:`normalize_member_name`). A truncated or unreadable tar
    ends the iteration with a warning after the last complete group (``strict=True``
    raises ``ValueError`` instead).
    """
    current_key, group = None, {}
    try:
        tf = tarfile.open(path, mode="r|*")
    except _STREAM_ERRORS as e:
        if strict:
            raise ValueError(f"{path}: not a readable tar: {e}") from e
        log.warning("cannot open %s as a tar: %s", path, e)
        return
    with tf:
        try:
            for info, data, bad in _iter_members(tf):
                if bad is not None:
                    log.warning("%s: skipping member %r (%s)", path, info.name, bad)
                    continue
                key, ext = split_member_name(info.name)
                if current_key is not None and key != current_key:
                    yield current_key, group
                    group = {}
                current_key = key
                group[ext] = data  # type: ignore[assignment]
        except _Truncated as e:
            if strict:
                raise ValueError(f"{path}: truncated: {e}") from e
            log.warning("%s is truncated: %s (the incomplete last group is dropped)", path, e)
            return
    if current_key is not None:
        yield current_key, group


# --------------------------------------------------------------------------- the atomic writer

#: tar headers carry this mtime so identical inputs give byte-identical shards
FIXED_MTIME = 0


class AtomicTarWriter:
    """Write a tar under a hidden temporary name beside ``path``; rename on success.

    Readers (and the landing sensor, which ignores names starting with ``.``) never see a
    partial file: :meth:`commit` (or leaving the ``with`` block normally) fsyncs and
    ``os.replace``-s it into place; an exception (or :meth:`abort`) deletes the temp file.
    Members get fixed metadata (``mtime``, mode 0644, no owner), so the same inputs give
    byte-identical tars.
    """

    def __init__(self, path: str | os.PathLike, mtime: int = FIXED_MTIME):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.mtime = mtime
        self._f = open(self.tmp, "wb")
        self._tf = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.n_members = 0

    def add(self, name: str, data: bytes) -> None:
        """Add one member ``name`` (a relative, normalized name; validated) with ``data``."""
        if normalize_member_name(name) != name or name.startswith("/") or ".." in name.split("/") or _CONTROL_RE.search(name):
            raise ValueError(f"member name: got {name!r}; expected a relative name without '..', './' or control characters")
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mtime = self.mtime
        ti.mode = 0o644
        ti.uname = ti.gname = ""
        self._tf.addfile(ti, io.BytesIO(data))
        self.n_members += 1

    def commit(self) -> Path:
        self._tf.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._tf.close()
        with contextlib.suppress(Exception):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self) -> "AtomicTarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def read_json_member(data: bytes) -> dict:
    """Parse a ``KEY.json`` member (``{}`` when it is not a JSON object)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
