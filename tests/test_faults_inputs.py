"""Fault injection: hostile input (issue 12, cases 3, 4, 6, 8, 9).

Every test goes through the public entry points the platform uses (``read_shard``,
``export_subset``, ``parse_recipe``, ``md_table``, the landing sensor), so each one failed on
the code before the fix (see docs/reliability.md for the before/after table).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation.ingest.shards import list_keys, read_shard

# --------------------------------------------------------------------------- helpers


def _img(fmt: str, size=(8, 8), mode="RGB", color=(200, 30, 30), **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode in ("RGB", "RGBA") else 128).save(buf, format=fmt, **save)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _read(tmp_path: Path, members, **kw):
    p = tmp_path / "ds" / "00000.tar"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(_tar(members))
    return read_shard(p, "ds", "ds-00000", **kw), p


def _reasons(res) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in res.quarantine}


def _accounted(res, p) -> None:
    keys = {r["key"] for r in res.samples} | {r["key"] for r in res.quarantine}
    assert keys == list_keys(p), "samples + quarantine must account for every key the shard holds"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims ``w x h`` (8-bit grey) with one tiny IDAT: the header is all that is read."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------- case 4: formats


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("bmp_as_jpg.jpg", _img("BMP"), "unsupported_format"),
        ("tiff_as_png.png", _img("TIFF"), "unsupported_format"),
        ("ico_as_webp.webp", _img("ICO", size=(16, 16)), "unsupported_format"),
        ("eps_as_jpg.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", "unsupported_format"),
        ("png_as_jpg.jpg", _img("PNG"), "format_mismatch"),
    ],
)
def test_format_allowlist_by_content(tmp_path, name, data, reason):
    key = name.split(".")[0]
    res, p = _read(tmp_path, [(name, data), (f"{key}.txt", b"a caption")])
    assert _reasons(res) == {key: reason}
    assert not res.samples
    _accounted(res, p)


def test_extreme_aspect_ratios_are_rejected_from_the_header(tmp_path):
    # 30000x1 and 40,000,000x1 pass a 40-megapixel limit; neither may reach the decoder
    res, p = _read(
        tmp_path,
        [("wide.png", _png_header_only(30_000, 1)), ("wide.txt", b"w"),
         ("huge.png", _png_header_only(40_000_000, 1)), ("huge.txt", b"h"),
         ("ok.png", _img("PNG", size=(60, 20))), ("ok.txt", b"fine")],
    )
    assert _reasons(res) == {"wide": "extreme_aspect_ratio", "huge": "extreme_aspect_ratio"}
    assert [r["key"] for r in res.samples] == ["ok"]
    assert "aspect ratio" in res.quarantine[0]["detail"]


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    from curation.embed.encoders import to_rgb

    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # mode I;16 -> 16-bit greyscale PNG
    from curation.ingest.images import open_image

    rgb = np.asarray(to_rgb(open_image(buf.getvalue(), "png").image))
    want = np.rint(arr.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1
    assert (rgb == 255).mean() < 0.05, "16-bit grey must not saturate to white"
    # and the embed stage's path (to_rgb on what Pillow opens) agrees
    raw = Image.open(io.BytesIO(buf.getvalue()))
    assert np.abs(np.asarray(to_rgb(raw))[..., 0].astype(int) - want).max() <= 1


def test_exif_rotated_jpeg_is_upright(tmp_path):
    from curation.ingest.images import open_image

    # stored 40x20 with orientation 6 (rotate 90 CW to display): upright it is 20x40
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band at the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    res, p = _read(tmp_path, [("rot.jpg", buf.getvalue()), ("rot.txt", b"rotated")])
    (row,) = res.samples
    assert (row["width"], row["height"]) == (20, 40)
    up = np.asarray(open_image(buf.getvalue(), "jpg").image)
    assert up.shape[:2] == (40, 20)
    assert up[:5, :, 0].mean() > 200 and up[:5, :, 1].mean() < 60, "the red band is on top once upright"


def test_animated_gif_and_apng_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif, apng = io.BytesIO(), io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:], duration=50)
    res, p = _read(tmp_path, [("g.gif", gif.getvalue()), ("g.txt", b"gif"), ("a.png", apng.getvalue()), ("a.txt", b"apng")])
    assert not res.quarantine, res.quarantine
    assert {r["key"]: r["format"] for r in res.samples} == {"g": "gif", "a": "png"}
    from curation.ingest.images import open_image

    im = open_image(gif.getvalue(), "gif")
    assert im.frames == 2 and np.asarray(im.image.convert("RGB"))[0, 0].tolist() == [255, 0, 0]


# --------------------------------------------------------------------------- case 9: captions, names, sidecars


def test_huge_caption_is_quarantined_and_nul_caption_is_empty(tmp_path):
    png = _img("PNG")
    res, p = _read(
        tmp_path,
        [("big.png", png), ("big.txt", b"x" * 5_000_000),
         ("nul.png", png), ("nul.txt", b"\x00\x00\x00"),
         ("ctl.png", png), ("ctl.txt", b"a\x00 cat\x07")],
    )
    assert _reasons(res) == {"big": "caption_too_long", "nul": "empty_caption"}
    assert [(r["key"], r["caption"]) for r in res.samples] == [("ctl", "a cat")]


def test_equivalent_member_names_are_one_key(tmp_path):
    png = _img("PNG")
    nfd = "cafe\u0301"  # decomposed é
    nfc = "caf\u00e9"
    res, p = _read(
        tmp_path,
        [("./a.png", png), ("a.txt", b"one sample"),
         (f"{nfd}.png", png), (f"{nfc}.txt", b"composed"),
         ("b.png", png), ("b.txt", b"first"), ("./b.png", png), ("./b.txt", b"again"),
         ("x\ny.png", png), ("x\ny.txt", b"newline in name")],
    )
    assert {r["key"] for r in res.samples} == {"a", nfc}
    assert _reasons(res) == {"b": "duplicate_key", "x\ny": "unsafe_member_name"}
    _accounted(res, p)


def test_integer_sidecar_keys_and_broken_sidecar(tmp_path):
    png = _img("PNG")
    res, p = _read(tmp_path, [("000000007.png", png), ("000000007.txt", b"seven")])
    pl.DataFrame({"key": [7], "status": ["success"]}).write_parquet(p.with_suffix(".parquet"))
    res = read_shard(p, "ds", "ds-00000")
    assert not res.quarantine and [r["key"] for r in res.samples] == ["000000007"]
    _accounted(res, p)
    p.with_suffix(".parquet").write_bytes(b"PAR1 this is not parquet")
    res = read_shard(p, "ds", "ds-00000")
    assert _reasons(res) == {"": "unreadable_manifest"}
    assert [r["key"] for r in res.samples] == ["000000007"]
    _accounted(res, p)


def test_empty_tar_is_a_visible_quarantine_row(tmp_path):
    res, p = _read(tmp_path, [])
    assert _reasons(res) == {"": "empty_shard"}
    _accounted(res, p)


def test_corrupt_image_detail_is_reproducible(tmp_path):
    bad = b"\x89PNG\r\n\x1a\n" + b"garbage that no decoder accepts" * 4  # PNG magic, no PNG
    members = [("c.png", bad), ("c.txt", b"cut")]
    d1 = _read(tmp_path, members)[0].quarantine
    d2 = _read(tmp_path, members)[0].quarantine
    assert d1 == d2 and d1[0]["reason"] == "corrupt_image"
    assert " at 0x" not in d1[0]["detail"]


# --------------------------------------------------------------------------- case 6: containment


def test_recipe_names_cannot_escape_the_data_home(tmp_path):
    from curation.select.recipes import parse_recipe
    from curation.storage.data_home import safe_child

    for bad in ("../../../x@0.5", "a/b", "..", ".hidden", "x\ny", "/abs"):
        with pytest.raises(ValueError, match="recipe name"):
            parse_recipe(bad, {"method": "full"})
    assert parse_recipe("dbp@0.5", {"method": "full"}).name == "dbp@0.5"
    with pytest.raises(ValueError):
        safe_child(tmp_path, "..", "x")
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ValueError, match="outside"):
        safe_child(tmp_path, "link")
    assert safe_child(tmp_path, "subsets", "dbp@0.5") == tmp_path / "subsets" / "dbp@0.5"


def test_artifact_dirs_are_contained(tmp_path):
    from resources import LakeResource

    lr = LakeResource(root=str(tmp_path / "lake"), artifacts_root=str(tmp_path / "artifacts"))
    with pytest.raises(ValueError):
        lr.artifacts("subsets", "../../../escaped@0.5")
    assert not (tmp_path.parent / "escaped@0.5").exists()


# --------------------------------------------------------------------------- case 3: export verifies bytes


def test_export_refuses_bytes_that_changed_since_ingest(tmp_path):
    from curation.select.export import export_subset

    landing = tmp_path / "landing"
    (landing / "ds").mkdir(parents=True)
    a, b = _img("PNG", color=(1, 2, 3)), _img("PNG", color=(4, 5, 6))
    tar = landing / "ds" / "00000.tar"
    tar.write_bytes(_tar([("k.png", a), ("k.txt", b"cap")]))
    res = read_shard(tar, "ds", "ds-00000")
    samples = res.samples_frame()
    assert len(a) == len(b)
    st = tar.stat()
    tar.write_bytes(_tar([("k.png", b), ("k.txt", b"cap")]))  # same size ...
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and mtime restored
    sel = pl.DataFrame({"uid": samples["uid"], "rank": [0], "score": [1.0]})
    out = export_subset(tmp_path / "exp", sel, samples, landing)
    assert out["n_changed"] == 1 and out["n_shards"] == 0
    info = json.loads((tmp_path / "exp" / "recipe.json").read_text())
    assert info["changed_uids"] == samples["uid"].to_list()


def test_landing_sensor_sees_same_size_same_mtime_replacement(tmp_path):
    import dagster as dg

    from assets.partitions import SHARDS
    from assets.sensors import landing_sensor
    from resources import DatasetsResource

    landing = tmp_path / "landing"
    (landing / "ds").mkdir(parents=True)
    a, b = _img("PNG", color=(1, 2, 3)), _img("PNG", color=(4, 5, 6))
    tar = landing / "ds" / "00000.tar"
    tar.write_bytes(_tar([("k.png", a), ("k.txt", b"cap")]))
    instance = dg.DagsterInstance.ephemeral()
    ds = DatasetsResource(landing=str(landing), eval_root=str(tmp_path / "eval"))

    def tick(cursor):
        return landing_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"datasets": ds}))

    first = tick(None)
    assert len(first.run_requests) == 1
    instance.add_dynamic_partitions(SHARDS, ["ds-00000"])
    st = tar.stat()
    # rewritten in place (same inode), same size, mtime restored
    with open(tar, "r+b") as f:
        f.write(_tar([("k.png", b), ("k.txt", b"cap")]))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tar.stat().st_size == st.st_size
    again = tick(first.cursor)
    assert [r.partition_key for r in again.run_requests] == ["ds-00000"]
    assert again.run_requests[0].run_key != first.run_requests[0].run_key


def test_landing_sensor_scrub_catches_what_stat_cannot(tmp_path, monkeypatch):
    """Even when every stat field looks the same, the rolling scrub re-hashes the file."""
    import dagster as dg

    from assets import sensors
    from assets.partitions import SHARDS
    from resources import DatasetsResource

    landing = tmp_path / "landing"
    (landing / "ds").mkdir(parents=True)
    tar = landing / "ds" / "00000.tar"
    tar.write_bytes(_tar([("k.png", _img("PNG")), ("k.txt", b"cap")]))
    instance = dg.DagsterInstance.ephemeral()
    ds = DatasetsResource(landing=str(landing), eval_root=str(tmp_path / "eval"))
    first = sensors.landing_sensor(dg.build_sensor_context(instance=instance, cursor=None, resources={"datasets": ds}))
    instance.add_dynamic_partitions(SHARDS, ["ds-00000"])
    monkeypatch.setattr(sensors, "_file_sig", lambda st: "frozen")  # a file system whose stat lies
    cur = json.loads(first.cursor)
    cur["files"]["ds-00000"]["sig"] = "frozen"
    tar.write_bytes(_tar([("k.png", _img("PNG", color=(9, 9, 9))), ("k.txt", b"cap")]))
    out = sensors.landing_sensor(
        dg.build_sensor_context(instance=instance, cursor=json.dumps(cur), resources={"datasets": ds})
    )
    assert [r.partition_key for r in out.run_requests] == ["ds-00000"]


# --------------------------------------------------------------------------- case 8: markdown


def test_captions_are_inert_in_markdown_metadata():
    from assets.metadata import md_table

    hostile = [
        "<script>alert(1)</script>",
        "![x](http://evil.example/track.png)",
        "[click](javascript:alert(1))",
        "# heading **bold** `code`",
        "<img src=x onerror=alert(1)>",
        "www.evil.example",
    ]
    out = md_table(pl.DataFrame({"caption": hostile}), max_chars=200)
    import re

    assert "<script" not in out and "<img" not in out
    body = out.split("\n", 2)[2]
    # no markdown punctuation is left unescaped (pipes between cells aside)
    cells = [c for line in body.splitlines() for c in line.strip("| ").split(" | ")]
    assert all(not re.search(r"(?<!\\)[!\[\]()*`#_~]", c) for c in cells), cells
    assert "www." not in out and "http:" not in out
    assert "&lt;script&gt;" in out
