"""Embed one shard: turn a raw shard plus its ``samples`` rows into L2-normalized vectors.

The tar is read in one streaming pass (:func:`curation.ingest.shards.load_members`); Pillow
decode + the encoder's preprocessing run in a ``torch.utils.data.DataLoader`` with
``num_workers`` processes that overlap the model's forward pass; the captions are encoded in
length-sorted batches while the workers start and prefetch. Samples whose image fails to
decode or preprocess are returned as failures (the embeddings asset quarantines them with
stage ``"embed"``); nothing is dropped silently.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from curation.engine.compute import ComputeSpec
from curation.ingest.images import ImageRejected, open_image
from curation.embed.encoders import Encoder

log = logging.getLogger(__name__)

EMBED_STAGE = "embed"
#: Quarantine reason codes of the embed stage.
EMBED_REASONS = ("missing_member", "decompression_bomb", "decode_error", "preprocess_error")


# --------------------------------------------------------------------------- embed one shard


@dataclass
class ShardEmbeddings:
    """Output of :func:`embed_shard`.

    Attributes:
        uids: ``(n,)`` str, the embedded samples in input order (failures removed).
        image_emb: ``(n, d) float32``, unit norm.
        text_emb: ``(n, d') float32``, unit norm.
        failures: one dict per sample that could not be embedded, keys ``uid``, ``key``,
            ``reason`` (one of :data:`EMBED_REASONS`), ``detail``.
        encoder: the encoder id the vectors were made with.
        timings: seconds spent per phase: ``read_tar``, ``text``, ``wait_images`` (main
            process blocked on the loader), ``image_forward``, ``total``.
    """

    uids: np.ndarray
    image_emb: np.ndarray
    text_emb: np.ndarray
    failures: list[dict]
    encoder: str
    timings: dict[str, float] = field(default_factory=dict)

    def __iter__(self):  # allows ``uids, img, txt, failures = embed_shard(...)``
        return iter((self.uids, self.image_emb, self.text_emb, self.failures))

    @property
    def samples_per_second(self) -> float:
        total = self.timings.get("total", 0.0)
        return (len(self.uids) + len(self.failures)) / total if total > 0 else float("nan")


class _ImageBlobs(torch.utils.data.Dataset):
    """Map-style dataset over encoded image bytes: item ``i`` -> ``(i, tensor | None, error | None)``.

    Decoding and preprocessing run here, i.e. in the loader's worker processes.
    """

    def __init__(self, blobs: Sequence[bytes | None], names: Sequence[str], preprocess, max_pixels: int):
        self.blobs = blobs
        self.names = names
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        data = self.blobs[i]
        if data is None:
            return i, None, ("missing_member", f"{self.names[i]!r} not found in the tar")
        try:
            # the platform's one image-opening function: allowlist, bounds, EXIF, bit depth
            img = open_image(data, self.names[i].rsplit(".", 1)[-1], max_pixels=self.max_pixels).image
        except ImageRejected as e:
            reason = e.reason if e.reason in ("decompression_bomb", "extreme_aspect_ratio") else "decode_error"
            return i, None, (reason, e.detail if reason != "decode_error" else f"{e.reason}: {e.detail}")
        try:
            x = self.preprocess(img)
            if not isinstance(x, torch.Tensor) or x.ndim != 3:
                raise TypeError(f"preprocess returned {type(x).__name__} {getattr(x, 'shape', '')}; expected (3, H, W)")
            if not np.isfinite(x.numpy() if x.device.type == "cpu" else x.cpu().numpy()).all():
                raise ValueError("preprocessed image has non-finite values")
        except Exception as e:  # noqa: BLE001 - report, do not crash the shard
            return i, None, ("preprocess_error", _describe(e))
        return i, x, None


def _describe(e: Exception) -> str:
    """``"Type: message"`` without object addresses, so a failure's detail is reproducible."""
    return f"{type(e).__name__}: " + re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e))


def _collate(items):
    """Stack the successful items; keep failures aside. -> (indices, (b,3,H,W) | None, failures)."""
    ok = [(i, x) for i, x, err in items if err is None]
    fails = [(i, err) for i, x, err in items if err is not None]
    idx = [i for i, _ in ok]
    if not ok:
        return idx, None, fails
    xs = [x for _, x in ok]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # in a worker: stack straight into shared memory (as default_collate does), so
        # handing the batch to the main process does not copy it again
        storage = xs[0]._typed_storage()._new_shared(len(xs) * xs[0].numel(), device=xs[0].device)
        out = xs[0].new(storage).resize_(len(xs), *xs[0].shape)
    return idx, torch.stack(xs, out=out), fails


def embed_shard(
    tar_path,
    samples: pl.DataFrame,
    encoder: Encoder,
    compute: ComputeSpec | None = None,
    max_pixels: int = 40_000_000,
    progress=None,
) -> ShardEmbeddings:
    """Embed the samples of one shard.

    Args:
        tar_path: the shard's ``.tar``.
        samples: the shard's ``samples`` rows; needs columns ``uid``, ``key``, ``member``
            (tar member name of the image), ``caption``.
        encoder: any :class:`~curation.embed.encoders.Encoder` (loaded once by the caller).
        compute: batch size and ``num_workers`` decode/preprocess processes (0: decode in
            this process, no overlap); the device/precision are the encoder's.
        max_pixels: images with more pixels are failures (``decompression_bomb``).
        progress: optional callable of a :class:`curation.engine.progress.ProgressEvent`, called after every batch.

    Returns:
        :class:`ShardEmbeddings` (unpacks as ``uids, image_emb, text_emb, failures``).
    """
    from curation.engine.progress import report
    from curation.ingest.shards import load_members

    compute = compute or ComputeSpec()
    missing = {"uid", "key", "member", "caption"} - set(samples.columns)
    if missing:
        raise ValueError(f"samples: missing columns {sorted(missing)}; expected uid, key, member, caption")
    t0 = time.perf_counter()
    timings = {"read_tar": 0.0, "text": 0.0, "wait_images": 0.0, "image_forward": 0.0}
    n = samples.height
    uids = samples["uid"].to_numpy().astype(str)
    keys = samples["key"].to_list()
    members = samples["member"].to_list()
    captions = samples["caption"].to_list()
    if n == 0:
        return ShardEmbeddings(
            uids=uids,
            image_emb=np.zeros((0, encoder.image_dim), np.float32),
            text_emb=np.zeros((0, encoder.text_dim), np.float32),
            failures=[],
            encoder=encoder.id,
            timings={**timings, "total": time.perf_counter() - t0},
        )

    t = time.perf_counter()
    data = load_members(tar_path, members)
    blobs = [data.get(m) for m in members]
    del data
    timings["read_tar"] = time.perf_counter() - t

    workers = min(compute.num_workers, max(1, n // max(1, compute.batch_size)))
    loader = torch.utils.data.DataLoader(
        _ImageBlobs(blobs, members, encoder.preprocess, max_pixels),
        batch_size=compute.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=compute.torch_device().type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    batches = iter(loader)  # workers start and begin decoding now ...

    t = time.perf_counter()
    text_emb = encoder.encode_texts(captions)  # ... while the captions are encoded here
    timings["text"] = time.perf_counter() - t

    image_emb = np.empty((n, encoder.image_dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    failures: list[dict] = []
    while True:
        t = time.perf_counter()
        try:
            idx, batch, fails = next(batches)
        except StopIteration:
            break
        timings["wait_images"] += time.perf_counter() - t
        for i, (reason, detail) in fails:
            failures.append({"uid": str(uids[i]), "key": keys[i], "reason": reason, "detail": detail})
        if batch is None:
            continue
        t = time.perf_counter()
        image_emb[idx] = encoder.encode_image_batch(batch)
        timings["image_forward"] += time.perf_counter() - t
        ok[idx] = True
        report(progress, "embed", int(ok.sum() + len(failures)), n, int(ok.sum() + len(failures)), time.perf_counter() - t0)
    del batches, loader

    if not ok.all():
        image_emb, text_emb, uids = image_emb[ok], text_emb[ok], uids[ok]
    timings["total"] = time.perf_counter() - t0
    if failures:
        log.warning("%s: %d of %d samples failed to embed", tar_path, len(failures), n)
    return ShardEmbeddings(uids, image_emb, text_emb, failures, encoder.id, timings)


def embeddings_frame(shard: str, result: ShardEmbeddings) -> pa.Table:
    """The ``embeddings`` rows of one shard: uid, shard, image_emb, text_emb (List(f32)), encoder."""
    from curation.storage.lake import matrix_to_list_column

    n = len(result.uids)
    return pa.table(
        {
            "uid": pa.array(result.uids.tolist(), pa.string()),
            "shard": pa.array([shard] * n, pa.string()),
            "image_emb": matrix_to_list_column(result.image_emb),
            "text_emb": matrix_to_list_column(result.text_emb),
            "encoder": pa.array([result.encoder] * n, pa.string()),
        }
    )


def failures_frame(dataset: str, shard: str, failures: Sequence[dict]) -> pl.DataFrame:
    """Embed-stage ``quarantine`` rows: dataset, shard, key, stage ("embed"), reason, detail."""
    return pl.DataFrame(
        {
            "dataset": [dataset] * len(failures),
            "shard": [shard] * len(failures),
            "key": [f["key"] for f in failures],
            "stage": [EMBED_STAGE] * len(failures),
            "reason": [f["reason"] for f in failures],
            "detail": [f["detail"] for f in failures],
        },
        schema={c: pl.String for c in ("dataset", "shard", "key", "stage", "reason", "detail")},
    )
