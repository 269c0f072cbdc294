"""Thumbnails read from the landing shards on demand, as small base64 ``data:`` URIs.

Every view that shows a decision about samples (cluster galleries, duplicate groups, kept
vs removed, quarantine) calls :func:`load_thumbnails` with the rows it wants to show. The
shards are read in one streaming pass each (:func:`curation.ingest.shards.load_members`);
nothing is cached on disk. Bounds keep the views small whatever the pool: at most
``max_count`` thumbnails per call and ``size`` pixels on the longer side (the encoded bytes
are bounded too), and the pixel-count limit of ingest is checked before decoding.

A sample whose bytes do not decode (e.g. a quarantined ``corrupt_image``) gets ``None``; the
views show a placeholder with the reason.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import tarfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from curation.ingest.shards import (
    IMAGE_EXTS,
    load_members,
    shard_path,
    split_member_name,
)

log = logging.getLogger(__name__)

DEFAULT_SIZE = 96  # px, longer side
MAX_SIZE = 512
DEFAULT_MAX_COUNT = 200
MAX_COUNT = 2000
MAX_SOURCE_PIXELS = 40_000_000  # the ingest default (DatasetsResource.max_pixels)
MAX_THUMB_BYTES = 64_000  # a larger encoding is retried at lower quality, then dropped


@dataclass(frozen=True)
class ThumbRequest:
    """One sample to show: its uid, shard key and the tar member holding its image."""

    uid: str
    shard: str
    member: str


def _check_bounds(size: int, max_count: int) -> None:
    if not 8 <= size <= MAX_SIZE:
        raise ValueError(f"thumbnail size: got {size}; expected 8 <= size <= {MAX_SIZE}")
    if not 1 <= max_count <= MAX_COUNT:
        raise ValueError(f"thumbnail max_count: got {max_count}; expected 1 <= max_count <= {MAX_COUNT}")


def thumbnail_bytes(data: bytes, size: int = DEFAULT_SIZE, max_pixels: int = MAX_SOURCE_PIXELS) -> bytes | None:
    """A JPEG thumbnail (longer side ``size`` px, alpha flattened on white) of image ``data``.

    Returns ``None`` when the bytes do not decode or the image has more than ``max_pixels``
    pixels (checked from the header, before decoding).
    """
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # our own limit, checked before decoding
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w <= 0 or h <= 0 or w * h > max_pixels:
                    return None
                img.draft("RGB", (size, size))  # JPEG: decode at reduced scale
                img = img.convert("RGBA")
                img.thumbnail((size, size), Image.Resampling.LANCZOS)
                flat = Image.new("RGB", img.size, (255, 255, 255))
                flat.paste(img, mask=img.getchannel("A"))
        for quality in (85, 60, 35):
            buf = io.BytesIO()
            flat.save(buf, format="JPEG", quality=quality, optimize=True)
            if buf.tell() <= MAX_THUMB_BYTES:
                return buf.getvalue()
        return None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        log.debug("thumbnail: undecodable image (%s: %s)", type(e).__name__, e)
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def data_uri(jpeg: bytes) -> str:
    """``data:image/jpeg;base64,...`` for thumbnail bytes."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def load_thumbnails(
    landing: str | os.PathLike,
    requests: Sequence[ThumbRequest] | Iterable[Mapping],
    size: int = DEFAULT_SIZE,
    max_count: int = DEFAULT_MAX_COUNT,
) -> dict[str, str | None]:
    """Thumbnails of the requested samples as ``{uid: data URI or None}``.

    Args:
        landing: the landing zone (``landing/<dataset>/<stem>.tar``).
        requests: :class:`ThumbRequest` s or mappings with keys ``uid``, ``shard``, ``member``.
        size: longer side in px (8..512).
        max_count: at most this many thumbnails (the first ones requested; 1..2000); the rest
            are absent from the result.

    Returns:
        One entry per requested uid (up to ``max_count``): a JPEG ``data:`` URI, or ``None``
        when the shard or member is missing or the bytes do not decode.
    """
    _check_bounds(size, max_count)
    reqs: list[ThumbRequest] = []
    seen: set[str] = set()
    for r in requests:
        r = r if isinstance(r, ThumbRequest) else ThumbRequest(str(r["uid"]), str(r["shard"]), str(r["member"]))
        if r.uid in seen:
            continue
        seen.add(r.uid)
        reqs.append(r)
        if len(reqs) >= max_count:
            break
    by_shard: dict[str, list[ThumbRequest]] = defaultdict(list)
    for r in reqs:
        by_shard[r.shard].append(r)
    out: dict[str, str | None] = {r.uid: None for r in reqs}
    for shard, rs in by_shard.items():
        try:
            path = shard_path(landing, shard)
        except ValueError as e:
            log.warning("thumbnails: %s", e)
            continue
        if not path.exists():
            log.warning("thumbnails: shard %s not found at %s", shard, path)
            continue
        data = load_members(path, {r.member for r in rs})
        for r in rs:
            if r.member in data:
                jpeg = thumbnail_bytes(data[r.member], size)
                out[r.uid] = data_uri(jpeg) if jpeg is not None else None
    return out


def load_key_thumbnails(
    landing: str | os.PathLike,
    shard_keys: Iterable[tuple[str, str]],
    size: int = DEFAULT_SIZE,
    max_count: int = DEFAULT_MAX_COUNT,
) -> dict[tuple[str, str], str | None]:
    """Thumbnails by ``(shard, sample key)`` for samples with no ``samples`` row (quarantine).

    The image member is found by key (any of ``IMAGE_EXTS``) in one streaming pass per shard.
    Returns ``{(shard, key): data URI or None}`` (``None``: no image member or it does not
    decode: the quarantine reason then says why).
    """
    _check_bounds(size, max_count)
    wanted: dict[str, set[str]] = defaultdict(set)
    order: list[tuple[str, str]] = []
    for shard, key in shard_keys:
        if (shard, key) in order:
            continue
        order.append((shard, key))
        wanted[shard].add(key)
        if len(order) >= max_count:
            break
    out: dict[tuple[str, str], str | None] = {sk: None for sk in order}
    for shard, keys in wanted.items():
        try:
            path = shard_path(landing, shard)
        except ValueError:
            continue
        for key, data in _image_members_by_key(path, keys).items():
            jpeg = thumbnail_bytes(data, size)
            out[(shard, key)] = data_uri(jpeg) if jpeg is not None else None
    return out


def _image_members_by_key(path: Path, keys: set[str]) -> dict[str, bytes]:
    """``{key: image bytes}`` for the wanted keys of a tar (robust to damaged tars)."""
    out: dict[str, bytes] = {}
    if not path.exists():
        return out
    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("thumbnails: cannot open %s: %s", path, e)
        return out
    with tf:
        try:
            for info in tf:
                if not info.isfile() or info.size > 64 * 2**20:
                    continue
                key, ext = split_member_name(info.name)
                if key in keys and key not in out and ext.lower() in IMAGE_EXTS:
                    f = tf.extractfile(info)
                    if f is not None:
                        out[key] = f.read()
                    if len(out) == len(keys):
                        break
        except (tarfile.TarError, OSError, EOFError) as e:  # truncated: keep what was read
            log.debug("thumbnails: %s ends early: %s", path, e)
    return out
