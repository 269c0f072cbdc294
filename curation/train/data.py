"""Training data: image-caption pairs streamed from webdataset shards in seeded, exact batches.

A subset is never held in memory: :class:`ShardPairs` reads the export's tars one at a time
through the platform's tar reader (:func:`curation.ingest.shards.iter_samples`), keeps at most
``shuffle_buffer`` ENCODED samples (bytes, a few KB each) and decodes and preprocesses only the
current batch. :class:`MemoryPairs` serves pairs already decoded (tests, small pools).

Samples seen are matched exactly (the DataComp protocol): :func:`batch_stream` yields
``ceil(samples_seen / batch)`` batches whose sizes sum to exactly ``samples_seen``
(:func:`curation.train.config.batch_sizes`), epoch after epoch; each epoch visits every sample
once in a fresh seeded order (shard order permuted, then a shuffle buffer), and drops its
ragged tail of ``n % batch`` samples so that no batch holds a sample twice.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from curation.ingest.shards import iter_samples

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
DEFAULT_SHUFFLE_BUFFER = 8192


def shuffle_buffered(items: Iterator, size: int, generator: torch.Generator) -> Iterator:
    """Stream ``items`` through a seeded shuffle buffer of ``size`` (webdataset's approach: the
    buffer fills, then each new item replaces a random one, which is yielded; the rest drain in
    random order). The same generator state gives the same order."""
    buf: list = []
    for p in items:
        if len(buf) < size:
            buf.append(p)
            continue
        j = int(torch.randint(len(buf), (1,), generator=generator))
        yield buf[j]
        buf[j] = p
    while buf:
        j = int(torch.randint(len(buf), (1,), generator=generator))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()

class PairSource(Protocol):
    """``n`` pairs, served one epoch at a time in an order drawn from a generator."""

    n: int

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[object, str]]:
        """Every pair once, as ``(image: PIL.Image | bytes, caption)``."""
        ...


def _pair(members: dict[str, bytes]) -> tuple[bytes, str] | None:
    img_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if img_ext is None or "txt" not in members:
        return None
    return members[img_ext], members["txt"].decode("utf-8").strip()


def decode_image(data: object) -> Image.Image:
    """Bytes (or an already decoded image) -> a fully loaded ``PIL.Image``."""
    if isinstance(data, Image.Image):
        return data
    img = Image.open(io.BytesIO(data))  # type: ignore[arg-type]
    img.load()
    return img


@dataclass
class MemoryPairs:
    """Pairs held in memory (decoded images or encoded bytes) in a fixed order."""

    images: Sequence[object]
    captions: Sequence[str]

    def __post_init__(self):
        if len(self.images) != len(self.captions):
            raise ValueError(f"images/captions: got {len(self.images)} and {len(self.captions)}; expected equal lengths")
        self.n = len(self.images)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[object, str]]:
        for i in torch.randperm(self.n, generator=generator).tolist():
            yield self.images[i], self.captions[i]


class ShardPairs:
    """Pairs streamed from webdataset tars (``KEY.<png|jpg|jpeg|webp>`` + ``KEY.txt``).

    Args:
        tar_paths: the shards (sorted for a stable order).
        shuffle_buffer: encoded samples held for shuffling (memory ~ buffer x sample bytes).

    ``n`` (samples with both an image and a caption) is counted by one streaming pass at
    construction; samples missing either are skipped with one warning.
    """

    def __init__(self, tar_paths: Iterable[str | Path], shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        self.paths = sorted(str(p) for p in tar_paths)
        if not self.paths:
            raise FileNotFoundError("no webdataset shards to train on (got an empty list of tar files)")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer: got {shuffle_buffer}; expected >= 1")
        self.shuffle_buffer = shuffle_buffer
        self.counts = []
        skipped = 0
        for p in self.paths:
            c = 0
            for _, members in iter_samples(p):
                if _pair(members) is None:
                    skipped += 1
                else:
                    c += 1
            self.counts.append(c)
        if skipped:
            log.warning("skipped %d samples without an image or a caption in %d shards", skipped, len(self.paths))
        self.n = sum(self.counts)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[object, str]]:
        order = torch.randperm(len(self.paths), generator=generator).tolist()
        pairs = (p for si in order for _, members in iter_samples(self.paths[si]) if (p := _pair(members)) is not None)
        yield from shuffle_buffered(pairs, self.shuffle_buffer, generator)


def read_webdataset_pairs(tar_paths: Iterable[str | Path]) -> tuple[list[str], list[Image.Image], list[str]]:
    """Read ALL pairs of some shards into memory (small sets only: tests, inspection).

    Returns:
        ``(keys, images, captions)`` in shard then member order; images decoded.
    """
    keys, images, captions = [], [], []
    skipped = 0
    for path in tar_paths:
        for key, members in iter_samples(path):
            p = _pair(members)
            if p is None:
                skipped += 1
                continue
            keys.append(key)
            images.append(decode_image(p[0]))
            captions.append(p[1])
    if skipped:
        log.warning("skipped %d samples without an image or a caption", skipped)
    return keys, images, captions


def batch_stream(
    source: PairSource, sizes: Sequence[int], batch: int, generator: torch.Generator
) -> Iterator[list[tuple[object, str]]]:
    """Batches of raw pairs: ``len(sizes)`` batches, batch ``i`` holding ``sizes[i]`` pairs.

    Epoch by epoch over ``source`` (a fresh order each); an epoch yields ``n // batch`` batches
    and drops its tail, so a batch never holds a sample twice. Requires ``2 <= batch <= n``.
    """
    n = source.n
    if not 1 <= batch <= n:
        raise ValueError(f"batch_size: got {batch}; expected 1 <= batch_size <= n = {n}")
    per_epoch = n // batch
    done = 0
    steps = len(sizes)
    while done < steps:
        it = source.epoch(generator)
        for _ in range(min(per_epoch, steps - done)):
            chunk = [next(it) for _ in range(batch)]
            yield chunk[: sizes[done]]
            done += 1
        it.close() if hasattr(it, "close") else None


def collate(
    pairs: Sequence[tuple[object, str]],
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode and preprocess one batch.

    Returns:
        ``(images (B, 3, S, S) float32, tokens (B, L) int64, flip_ok (B,) bool)``; transparency
        is composited on white (:func:`curation.embed.encoders.to_rgb`).
    """
    from curation.embed.encoders import to_rgb
    from curation.train.augmentation import mentions_left_right

    images = torch.stack([preprocess(to_rgb(decode_image(im))) for im, _ in pairs])
    caps = [c for _, c in pairs]
    flip_ok = torch.tensor([not mentions_left_right(c) for c in caps], dtype=torch.bool)
    return images, tokenizer(caps), flip_ok


def batch_index_stream(n: int, batch_size: int, steps: int, generator: torch.Generator,
                       sizes: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """Indices of ``steps`` batches of ``batch_size`` from ``n`` samples, epoch by epoch
    (the index form of :func:`batch_stream` for in-memory arrays).

    Yields:
        ``(batch_size,)`` (or ``(sizes[i],)``) int64 index tensors.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: got {batch_size}; expected 1 <= batch_size <= n = {n}")
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for b in range(min(per_epoch, steps - done)):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            yield idx if sizes is None else idx[: sizes[done + b]]
        done += min(per_epoch, steps - done)


class SelectedShardPairs:
    """Chosen members of several shards, streamed shard by shard (the filter model's pool).

    Args:
        shards: ``[(tar path, [(member name, caption), ...]), ...]``; only those members are
            read (:func:`curation.ingest.shards.load_members`, one shard's bytes at a time).
        shuffle_buffer: encoded samples held for shuffling across shards.

    Members missing from their tar are skipped (logged once per shard); ``n`` counts the
    requested members, so callers should pass only members known to exist.
    """

    def __init__(self, shards: Sequence[tuple[str | Path, Sequence[tuple[str, str]]]],
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):  # fmt: skip
        self.shards = [(str(p), list(items)) for p, items in shards if items]
        self.shuffle_buffer = shuffle_buffer
        self.n = sum(len(items) for _, items in self.shards)

    def iter_shard(self, i: int) -> Iterator[tuple[bytes, str]]:
        from curation.ingest.shards import load_members

        path, items = self.shards[i]
        blobs = load_members(path, [m for m, _ in items])
        missing = 0
        for member, caption in items:
            data = blobs.get(member)
            if data is None:
                missing += 1
                continue
            yield data, caption
        if missing:
            log.warning("%s: %d requested members missing", path, missing)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[object, str]]:
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        yield from shuffle_buffered((p for si in order for p in self.iter_shard(si)), self.shuffle_buffer, generator)
