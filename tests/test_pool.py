"""embed_shard (decode in loader workers, failures, order) and read_pool (one contiguous matrix)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curation.engine.compute import ComputeSpec
from curation.ingest.ids import make_uid
from curation.storage.lake import Lake, matrix_to_list_column
from curation.embed.shard_embedding import embed_shard, embeddings_frame, failures_frame
from curation.embed.pool_reader import read_pool

import pyarrow as pa


class MeanColorEncoder:
    """A tiny deterministic encoder: image -> normalized (mean R, G, B, 1); text -> length features."""

    id = "test:mean-color"
    image_dim = 4
    text_dim = 3
    aligned = False

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        v = torch.cat([batch.mean(dim=(2, 3)), torch.ones(len(batch), 1)], dim=1)
        return torch.nn.functional.normalize(v, dim=1).numpy().astype(np.float32)

    def encode_texts(self, texts) -> np.ndarray:
        v = np.array([[len(t), t.count(" ") + 1, 1.0] for t in texts], dtype=np.float32).reshape(-1, 3)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_images(self, images) -> np.ndarray:
        return self.encode_image_batch(torch.stack([self.preprocess(i) for i in images]))


def _png(color, size=(12, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def shard(tmp_path):
    """A tar with 7 usable images (PNG, JPEG, RGBA), one corrupt image; samples rows for 9 keys
    (one points at a member that is not in the tar)."""
    images = {
        "a.png": _png((255, 0, 0)),
        "b.png": _png((0, 255, 0)),
        "c.jpg": _jpeg((0, 0, 255)),
        "d.png": _png((10, 20, 30, 255), mode="RGBA"),
        "e.png": b"\x89PNG\r\n\x1a\n this is not a png",
        "f.png": _png((200, 200, 0)),
        "g.png": _png((0, 200, 200)),
        "h.png": _png((90, 90, 90), size=(300, 300)),
    }
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in images.items():
            for member, payload in ((name, data), (name.split(".")[0] + ".txt", f"caption {name}".encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    names = list(images) + ["z.png"]  # z.png is not in the tar
    rows = {
        "uid": [make_uid("t", "t-00000", n.split(".")[0]) for n in names],
        "key": [n.split(".")[0] for n in names],
        "member": names,
        "caption": [f"a caption for {n} " * (i + 1) for i, n in enumerate(names)],
    }
    return tar, pl.DataFrame(rows), images


def test_embed_shard_embeds_in_order_and_reports_failures(shard):
    tar, samples, images = shard
    enc = MeanColorEncoder()
    res = embed_shard(tar, samples, enc, ComputeSpec(device="cpu", batch_size=3, num_workers=0), max_pixels=50_000)
    fails = {f["key"]: f["reason"] for f in res.failures}
    assert fails == {"e": "decode_error", "z": "missing_member", "h": "decompression_bomb"}
    ok = samples.filter(~pl.col("key").is_in(list(fails)))
    assert res.uids.tolist() == ok["uid"].to_list()  # input order, failures removed
    assert res.image_emb.shape == (6, 4) and res.text_emb.shape == (6, 3)
    assert res.image_emb.dtype == np.float32 and res.text_emb.dtype == np.float32
    # each row is exactly the vector of that sample's own image and caption
    for i, member in enumerate(ok["member"].to_list()):
        want = enc.encode_images([Image.open(io.BytesIO(images[member]))])[0]
        np.testing.assert_allclose(res.image_emb[i], want, atol=1e-6)
    np.testing.assert_allclose(res.text_emb, enc.encode_texts(ok["caption"].to_list()), atol=1e-6)
    assert res.encoder == enc.id
    uids, img, txt, failures = res  # unpacks like a tuple
    assert len(uids) == len(img) == len(txt) == 6 and len(failures) == 3
    assert set(res.timings) >= {"read_tar", "text", "wait_images", "image_forward", "total"}


def test_embed_shard_workers_give_identical_results(shard):
    tar, samples, _ = shard
    enc = MeanColorEncoder()
    a = embed_shard(tar, samples, enc, ComputeSpec(device="cpu", batch_size=2, num_workers=0))
    b = embed_shard(tar, samples, enc, ComputeSpec(device="cpu", batch_size=2, num_workers=2))
    np.testing.assert_array_equal(a.uids, b.uids)
    np.testing.assert_array_equal(a.image_emb, b.image_emb)
    np.testing.assert_array_equal(a.text_emb, b.text_emb)
    assert a.failures == b.failures


def test_embed_shard_rgba_is_composited_on_white_by_real_encoders(tmp_path):
    """The default encoder's preprocessing sees a transparent pixel as white, not black."""
    from curation.embed.encoders import to_rgb

    img = Image.open(io.BytesIO(_png((0, 0, 0, 0), mode="RGBA")))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_embed_shard_empty_and_validation(shard):
    tar, samples, _ = shard
    enc = MeanColorEncoder()
    res = embed_shard(tar, samples.head(0), enc, ComputeSpec(device="cpu"))
    assert res.image_emb.shape == (0, 4) and res.text_emb.shape == (0, 3) and res.failures == []
    with pytest.raises(ValueError, match=r"missing columns \['member'\]"):
        embed_shard(tar, samples.drop("member"), enc)


def test_frames_have_the_table_schemas(shard):
    tar, samples, _ = shard
    res = embed_shard(tar, samples, MeanColorEncoder(), ComputeSpec(device="cpu", num_workers=0))
    t = embeddings_frame("t-00000", res)
    assert t.column_names == ["uid", "shard", "image_emb", "text_emb", "encoder"]
    assert t.schema.field("image_emb").type == pa.list_(pa.float32())
    q = failures_frame("t", "t-00000", res.failures)
    assert q.columns == ["dataset", "shard", "key", "stage", "reason", "detail"]
    assert set(q["stage"]) == {"embed"} and q.height == len(res.failures)


# --------------------------------------------------------------------------- read_pool


def _write_partition(lake: Lake, shard: str, uids, img, txt, encoder="enc-a"):
    n = len(uids)
    t = pa.table(
        {
            "uid": pa.array(list(uids), pa.string()),
            "shard": pa.array([shard] * n, pa.string()),
            "image_emb": matrix_to_list_column(img),
            "text_emb": matrix_to_list_column(txt),
            "encoder": pa.array([encoder] * n, pa.string()),
        }
    )
    lake.write("embeddings", t, partition=shard)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def pool_lake(tmp_path):
    rng = np.random.default_rng(0)
    lake = Lake(str(tmp_path / "lake"))
    parts = {}
    for shard, n in (("ds-00002", 5), ("ds-00000", 7), ("ds-00001", 0), ("ds-00003", 3)):
        uids = [make_uid("ds", shard, str(i)) for i in range(n)]
        img, txt = _unit(rng, n, 6), _unit(rng, n, 4)
        _write_partition(lake, shard, uids, img, txt)
        parts[shard] = (uids, img, txt)
    return lake, parts


def test_read_pool_returns_one_contiguous_matrix_in_shard_order(pool_lake):
    lake, parts = pool_lake
    pool = read_pool(lake)
    order = sorted(parts)
    assert len(pool) == 15
    assert pool.uids.tolist() == [u for s in order for u in parts[s][0]]
    assert pool.shards.tolist() == [s for s in order for _ in parts[s][0]]
    np.testing.assert_array_equal(pool.image, np.concatenate([parts[s][1] for s in order]))
    np.testing.assert_array_equal(pool.text, np.concatenate([parts[s][2] for s in order]))
    for m in (pool.image, pool.text):
        assert m.dtype == np.float32 and m.flags.c_contiguous
    assert pool.encoders == ["enc-a"] and pool.encoder == "enc-a"


def test_read_pool_chosen_shards_and_columns(pool_lake):
    lake, parts = pool_lake
    pool = read_pool(lake, shards=["ds-00003", "ds-00000", "ds-99999"], columns=["image"])
    assert pool.text is None
    assert pool.uids.tolist() == parts["ds-00000"][0] + parts["ds-00003"][0]
    np.testing.assert_array_equal(pool.image, np.concatenate([parts["ds-00000"][1], parts["ds-00003"][1]]))
    with pytest.raises(ValueError, match=r"columns: got \['audio'\]"):
        read_pool(lake, columns=["audio"])


def test_read_pool_rejects_mixed_encoders_and_dims(pool_lake, tmp_path):
    lake, _ = pool_lake
    rng = np.random.default_rng(1)
    _write_partition(lake, "ds-00009", ["u1", "u2"], _unit(rng, 2, 6), _unit(rng, 2, 4), encoder="enc-b")
    with pytest.raises(ValueError, match="different encoders"):
        read_pool(lake)
    mixed = read_pool(lake, allow_mixed=True)
    assert mixed.encoders == ["enc-a", "enc-b"] and mixed.encoder is None and len(mixed) == 17
    _write_partition(lake, "ds-00009", ["u1"], _unit(rng, 1, 5), _unit(rng, 1, 4))
    with pytest.raises(ValueError, match="have 5 dims; earlier shards have 6"):
        read_pool(lake)


def test_read_pool_missing_table_is_empty(tmp_path):
    pool = read_pool(Lake(str(tmp_path / "nolake")))
    assert len(pool) == 0 and pool.image.shape[0] == 0 and pool.encoders == []


class _PickyEncoder(MeanColorEncoder):
    def preprocess(self, img):
        if img.convert("RGB").getpixel((0, 0)) == (0, 255, 0):
            raise RuntimeError("no green allowed")
        return super().preprocess(img)


def test_embed_shard_preprocess_errors_are_failures_not_crashes(shard):
    tar, samples, _ = shard
    res = embed_shard(tar, samples, _PickyEncoder(), ComputeSpec(device="cpu", batch_size=4, num_workers=1))
    fails = {f["key"]: (f["reason"], f["detail"]) for f in res.failures}
    assert fails["b"] == ("preprocess_error", "RuntimeError: no green allowed")
    assert "b" not in {k for k in samples.filter(pl.col("uid").is_in(res.uids.tolist()))["key"]}
