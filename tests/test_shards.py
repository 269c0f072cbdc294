"""The streaming shard reader: keys, every bad-input case, the accounting invariant."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib

import polars as pl
import pytest
from PIL import Image

from curation.ingest.ids import make_uid
from curation.ingest.shards import (
    QUARANTINE_SCHEMA,
    SAMPLES_SCHEMA,
    find_shards,
    list_keys,
    load_members,
    parse_shard_key,
    read_shard,
    shard_key,
    shard_path,
)


def png(size=(8, 8), color=(0, 128, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpg(size=(10, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(w=20_000, h=20_000) -> bytes:
    """A valid PNG header announcing w x h pixels followed by a tiny (incomplete) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_tar(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    """members: list of (name, bytes) or TarInfo-with-bytes tuples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            if isinstance(m[0], tarfile.TarInfo):
                tf.addfile(m[0], io.BytesIO(m[1]) if m[1] is not None else None)
            else:
                name, data = m
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def good(key: str, caption: str = "a caption", image: bytes | None = None, ext: str = "png"):
    return [(f"{key}.{ext}", image if image is not None else png()), (f"{key}.txt", caption.encode()), (f"{key}.json", b"{}")]


def read_bytes(tmp_path, data: bytes, name: str = "00000.tar", **kw):
    p = tmp_path / name
    p.write_bytes(data)
    return read_shard(p, "ds", "ds-00000", **kw), p


def check_invariant(res, path):
    """Every distinct key seen ends in exactly one of samples or quarantine."""
    s = [r["key"] for r in res.samples]
    q = [r["key"] for r in res.quarantine]
    assert len(s) + len(q) == res.keys_seen == len(set(s) | set(q))
    assert not set(s) & set(q)
    assert set(s) | set(q) == list_keys(path)
    assert all(r["stage"] == "ingest" for r in res.quarantine)


def reasons(res) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in res.quarantine}


# --------------------------------------------------------------------------- keys


def test_shard_keys_round_trip_and_validate(tmp_path):
    assert shard_key("emoji", "00003") == "emoji-00003"
    assert parse_shard_key("emoji-00003") == ("emoji", "00003")
    assert parse_shard_key("emoji-heldout-00001") == ("emoji-heldout", "00001")
    with pytest.raises(ValueError, match="no '-'"):
        shard_key("emoji", "000-3")
    with pytest.raises(ValueError, match="expected '<dataset>-<stem>'"):
        parse_shard_key("nodash")
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    for rel in ["b/00001.tar", "a/00000.tar", "a/00001.tar", "a/.00002.tar", "a/x-y.tar", "a/00000.parquet"]:
        (tmp_path / rel).write_bytes(b"")
    found = find_shards(tmp_path)
    assert list(found) == ["a-00000", "a-00001", "b-00001"]
    assert found["b-00001"] == tmp_path / "b" / "00001.tar" == shard_path(tmp_path, "b-00001")
    assert find_shards(tmp_path / "missing") == {}


# --------------------------------------------------------------------------- good input


def test_clean_shard_rows_match_schema(tmp_path):
    data = make_tar(good("k1", "  hello world \n") + good("k2", "jpeg one", jpg(), "jpg"))
    res, p = read_bytes(tmp_path, data)
    assert res.quarantine == [] and not res.truncated and res.members == 6
    a, b = res.samples
    assert a["uid"] == make_uid("ds", "ds-00000", "k1")
    assert (a["caption"], a["width"], a["height"], a["format"], a["member"]) == ("hello world", 8, 8, "png", "k1.png")
    assert (b["format"], b["width"], b["height"], b["member"]) == ("jpeg", 10, 6, "k2.jpg")
    assert a["n_bytes"] == len(png())
    sdf = res.samples_frame()
    assert dict(sdf.schema) == SAMPLES_SCHEMA
    assert dict(res.quarantine_frame().schema) == QUARANTINE_SCHEMA
    check_invariant(res, p)


def test_reader_is_deterministic_and_compressed_tars_work(tmp_path):
    data = make_tar(good("a") + good("b"))
    r1, _ = read_bytes(tmp_path, data, "00000.tar")
    r2, _ = read_bytes(tmp_path, data, "00001.tar")
    assert r1.samples == r2.samples
    r3, _ = read_bytes(tmp_path, gzip.compress(data, mtime=0), "00002.tar")
    assert [r["key"] for r in r3.samples] == ["a", "b"] and r3.quarantine == []


# --------------------------------------------------------------------------- bad input, one case each


def test_truncated_tar_keeps_what_was_read(tmp_path):
    data = make_tar(good("a") + good("b") + good("c", "x" * 3000))
    # cut in the middle of c's caption data
    cut = data.index(b"x" * 100) + 500
    res, p = read_bytes(tmp_path, data[:cut])
    assert res.truncated
    assert [r["key"] for r in res.samples] == ["a", "b"]
    assert reasons(res) == {"c": "truncated_tar"}
    check_invariant(res, p)


def test_truncated_at_member_boundary_is_detected(tmp_path):
    data = make_tar(good("a") + [("b.png", png())])
    # everything up to the end of b.png's data, but no end-of-archive blocks
    end = len(data)
    members_end = data.rindex(b"IEND") + 8
    cut = ((members_end + 511) // 512) * 512
    assert cut < end
    res, p = read_bytes(tmp_path, data[:cut])
    assert res.truncated
    assert [r["key"] for r in res.samples] == ["a"]
    assert reasons(res) == {"b": "truncated_tar"}  # not "missing_caption": we cannot know
    check_invariant(res, p)


def test_truncated_tar_uses_parquet_manifest_for_unseen_keys(tmp_path):
    data = make_tar(good("a") + good("b") + good("c"))
    cut = data.index(b"b.png") + 700  # inside b's image
    (tmp_path / "00000.parquet").write_bytes(b"")
    pl.DataFrame({"key": ["a", "b", "c", "d"], "status": ["success"] * 3 + ["failed_to_download"]}).write_parquet(
        tmp_path / "00000.parquet"
    )
    res, p = read_bytes(tmp_path, data[:cut])
    assert [r["key"] for r in res.samples] == ["a"]
    assert reasons(res) == {"b": "truncated_tar", "c": "truncated_tar"}  # d was never downloaded
    check_invariant(res, p)


def test_manifest_key_missing_from_complete_tar(tmp_path):
    pl.DataFrame({"key": ["a", "z"]}).write_parquet(tmp_path / "00000.parquet")
    res, p = read_bytes(tmp_path, make_tar(good("a")))
    assert reasons(res) == {"z": "missing_from_tar"} and not res.truncated
    check_invariant(res, p)
    res2 = read_shard(p, "ds", "ds-00000", manifest=False)
    assert res2.quarantine == [] and res2.keys_seen == 1


def test_zero_byte_members(tmp_path):
    data = make_tar([("a.png", b""), ("a.txt", b"cap")] + [("b.png", png()), ("b.txt", b"")] + good("c"))
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {"a": "empty_member", "b": "empty_member"}
    assert [r["key"] for r in res.samples] == ["c"]
    check_invariant(res, p)


def test_corrupt_image_bytes(tmp_path):
    full = png((32, 32))
    data = make_tar(good("a", image=b"not an image at all") + good("b", image=full[: len(full) // 2]) + good("c"))
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {"a": "unsupported_format", "b": "corrupt_image"}
    assert [r["key"] for r in res.samples] == ["c"]
    check_invariant(res, p)


def test_missing_caption_and_missing_image(tmp_path):
    data = make_tar([("a.png", png()), ("a.json", b"{}"), ("b.txt", b"orphan caption"), ("b.json", b"{}")] + good("c"))
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {"a": "missing_caption", "b": "missing_image"}
    check_invariant(res, p)


def test_invalid_utf8_and_blank_captions(tmp_path):
    data = make_tar(good("a")[:1] + [("a.txt", b"caf\xe9 \xff")] + [("b.png", png()), ("b.txt", b"  \n ")] + good("c"))
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {"a": "invalid_utf8_caption", "b": "empty_caption"}
    check_invariant(res, p)


def test_decompression_bomb_is_rejected_from_the_header(tmp_path, monkeypatch):
    from PIL import ImageFile

    decoded = []
    orig_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return orig_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = make_tar(good("bomb", image=bomb_png()) + good("big", image=png((300, 300))) + good("ok"))
    res, p = read_bytes(tmp_path, data, max_pixels=50_000)
    assert reasons(res) == {"bomb": "decompression_bomb", "big": "decompression_bomb"}
    assert "400000000 pixels" in next(r["detail"] for r in res.quarantine if r["key"] == "bomb")
    assert (20_000, 20_000) not in decoded and (300, 300) not in decoded  # never decoded
    assert [r["key"] for r in res.samples] == ["ok"]
    check_invariant(res, p)
    # Pillow's own (larger) limit does not interfere with ours, and is restored afterwards
    before = Image.MAX_IMAGE_PIXELS
    res2, _ = read_bytes(tmp_path, make_tar(good("bomb", image=bomb_png(60_000, 60_000))), "00001.tar")
    assert reasons(res2) == {"bomb": "decompression_bomb"} and Image.MAX_IMAGE_PIXELS == before


def test_unsafe_member_names(tmp_path):
    link = tarfile.TarInfo("d.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    data = make_tar(
        [("../evil.png", png()), ("../evil.txt", b"x")]
        + [("/abs/e.png", png()), ("/abs/e.txt", b"x")]
        + [("sub/../../f.png", png())]
        + [(link, None), ("d.txt", b"x")]
        + good("sub/ok")
    )
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {
        "../evil": "unsafe_member_name",
        "/abs/e": "unsafe_member_name",
        "sub/../../f": "unsafe_member_name",
        "d": "unsafe_member_name",
    }
    assert [r["key"] for r in res.samples] == ["sub/ok"]  # a safe sub-directory is fine
    check_invariant(res, p)
    assert not (tmp_path.parent / "evil.png").exists()


def test_duplicate_keys(tmp_path):
    # adjacent duplicate member, and a key that re-appears after another key
    data = make_tar(
        [("a.png", png()), ("a.png", png()), ("a.txt", b"x")]
        + good("b") + good("c") + good("b", "again")
        + good("d")
    )
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {"a": "duplicate_key", "b": "duplicate_key"}
    assert [r["key"] for r in res.samples] == ["c", "d"]
    check_invariant(res, p)


def test_multiple_images_for_one_key(tmp_path):
    data = make_tar([("a.png", png()), ("a.jpg", jpg()), ("a.txt", b"x")] + good("b"))
    res, p = read_bytes(tmp_path, data)
    assert reasons(res) == {"a": "multiple_images"}
    check_invariant(res, p)


# gzip's header holds the compression time unless mtime is given: the parameter (and the test id
# pytest makes of its bytes) must be the same in every process that collects the suite
@pytest.mark.parametrize("payload", [b"", b"hello, I am not a tar" * 100, gzip.compress(b"plain text", mtime=0)],
                         ids=["empty", "text", "gzip"])
def test_not_a_tar(tmp_path, payload):
    res, p = read_bytes(tmp_path, payload)
    assert not res.is_tar and res.samples == []
    assert [(r["key"], r["reason"]) for r in res.quarantine] == [("", "not_a_tar")]
    check_invariant(res, p)


def test_not_a_tar_with_manifest_quarantines_each_key(tmp_path):
    pl.DataFrame({"key": ["a", "b"], "status": ["success", "success"]}).write_parquet(tmp_path / "00000.parquet")
    res, p = read_bytes(tmp_path, b"<html>404</html>")
    assert reasons(res) == {"a": "not_a_tar", "b": "not_a_tar"}
    check_invariant(res, p)


def test_everything_at_once_loses_nothing(tmp_path):
    data = make_tar(
        good("ok1")
        + [("e.png", b""), ("e.txt", b"x")]
        + good("bad", image=b"garbage")
        + [("nocap.png", png())]
        + [("../up.png", png())]
        + good("ok2")
        + good("ok1")
        + good("tail", "y" * 2000)
    )
    cut = data.index(b"y" * 100) + 200
    res, p = read_bytes(tmp_path, data[:cut])
    assert reasons(res) == {
        "ok1": "duplicate_key",
        "e": "empty_member",
        "bad": "unsupported_format",
        "nocap": "missing_caption",
        "../up": "unsafe_member_name",
        "tail": "truncated_tar",
    }
    assert [r["key"] for r in res.samples] == ["ok2"]
    check_invariant(res, p)
    assert res.reasons() == {
        "duplicate_key": 1, "empty_member": 1,
        "missing_caption": 1, "truncated_tar": 1, "unsafe_member_name": 1, "unsupported_format": 1,
    }


# --------------------------------------------------------------------------- load_members


def test_load_members_one_pass(tmp_path):
    data = make_tar(good("a", "A") + good("b", "caption of b") + good("c", "C"))
    p = tmp_path / "00000.tar"
    p.write_bytes(data)
    got = load_members(p, ["b.txt", "a.png", "zzz.png"])
    assert got == {"a.png": png(), "b.txt": b"caption of b"}
    assert load_members(p, []) == {}
    (tmp_path / "bad.tar").write_bytes(b"nope")
    assert load_members(tmp_path / "bad.tar", ["a.png"]) == {}
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"caption of b") + 5])
    assert set(load_members(tmp_path / "cut.tar", ["a.txt", "c.txt"])) == {"a.txt"}


def test_tar_whose_first_name_looks_like_a_magic_number_is_still_checked(tmp_path):
    # "(\xb5/\xfd" is zstd's magic, "BZh" bzip2's: names must not disable truncation checks
    data = make_tar([("BZh1.png", png()), ("BZh1.txt", b"x"), ("BZh2.png", png())])
    cut = ((data.rindex(b"IEND") + 8 + 511) // 512) * 512
    res, p = read_bytes(tmp_path, data[:cut])
    assert res.truncated and reasons(res) == {"BZh2": "truncated_tar"}
    check_invariant(res, p)


def test_missing_file_is_an_error_not_bad_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_shard(tmp_path / "nope.tar", "ds", "ds-nope")
