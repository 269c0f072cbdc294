"""Subset exports: DataComp uid file, manifest, webdataset shards readable by webdataset."""

import io
import json
import tarfile

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation.select.export import export_subset
from curation.ingest.ids import make_uid, u128_to_uids


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def landing(tmp_path):
    root = tmp_path / "landing"
    rows = []
    for stem in ("00000", "00001"):
        (root / "toy").mkdir(parents=True, exist_ok=True)
        shard = f"toy-{stem}"
        with tarfile.open(root / "toy" / f"{stem}.tar", "w") as tf:
            for i in range(5):
                key = f"{stem}{i:04d}"
                img = _png((i * 40, int(stem) * 100, 7))
                _add(tf, f"{key}.png", img)
                _add(tf, f"{key}.txt", f"caption {key}".encode())
                _add(tf, f"{key}.json", b"{}")
                rows.append(dict(uid=make_uid("toy", shard, key), dataset="toy", shard=shard, key=key,
                                 caption=f"caption {key}", member=f"{key}.png", png=img))
    return root, pl.DataFrame(rows)


def test_export_writes_readable_subset(tmp_path, landing):
    root, samples = landing
    kept = samples[[1, 3, 6, 9]]
    sel = pl.DataFrame({"uid": kept["uid"], "rank": [2, 0, 3, 1], "score": [0.1, 0.2, 0.3, 0.4]})
    out = tmp_path / "subset"
    stats = export_subset(out, sel, samples.drop("png"), root, recipe={"name": "x", "method": "random"}, shard_size=3)
    assert stats["n"] == 4 and stats["n_shards"] == 2 and stats["n_missing"] == 0

    arr = np.load(out / "uids.npy")
    assert arr.dtype == np.uint64 and arr.shape == (4, 2)
    assert u128_to_uids(arr) == sorted(kept["uid"].to_list())

    man = pl.read_parquet(out / "manifest.parquet")
    assert man.columns == ["uid", "shard", "key", "caption", "rank", "score"]
    assert man["rank"].to_list() == [0, 1, 2, 3]

    rec = json.loads((out / "recipe.json").read_text())
    assert rec["recipe"]["method"] == "random" and rec["n"] == 4

    import webdataset as wds

    got = {}
    for s in wds.WebDataset([str(p) for p in sorted((out / "shards").glob("*.tar"))], shardshuffle=False):
        got[s["__key__"]] = s
    assert set(got) == set(kept["uid"].to_list())
    for row in kept.iter_rows(named=True):
        s = got[row["uid"]]
        assert s["png"] == row["png"]  # bytes copied unchanged
        assert s["txt"].decode() == row["caption"]
        assert json.loads(s["json"])["key"] == row["key"]


def test_reexport_replaces_previous_files(tmp_path, landing):
    root, samples = landing
    s = samples.drop("png")
    out = tmp_path / "subset"
    export_subset(out, pl.DataFrame({"uid": s["uid"], "rank": range(10), "score": [0.0] * 10}), s, root, shard_size=2)
    assert len(list((out / "shards").glob("*.tar"))) == 5
    export_subset(out, pl.DataFrame({"uid": s["uid"][:1], "rank": [0], "score": [0.0]}), s, root, shard_size=2)
    assert len(list((out / "shards").glob("*.tar"))) == 1
    assert np.load(out / "uids.npy").shape == (1, 2)


def test_unknown_uid_and_missing_member(tmp_path, landing):
    root, samples = landing
    s = samples.drop("png")
    with pytest.raises(ValueError, match="without a samples row"):
        export_subset(tmp_path / "a", pl.DataFrame({"uid": ["f" * 32], "rank": [0], "score": [0.0]}), s, root)
    broken = s.with_columns(pl.when(pl.col("key") == "000000000").then(pl.lit("gone.png")).otherwise(pl.col("member")).alias("member"))
    stats = export_subset(tmp_path / "b", pl.DataFrame({"uid": s["uid"][:2], "rank": [0, 1], "score": [0.0, 0.0]}), broken, root)
    assert stats["n_missing"] == 1 and stats["n"] == 2
    assert json.loads((tmp_path / "b" / "recipe.json").read_text())["missing_uids"] == [s["uid"][0]]


def test_kept_samples_are_streamed_from_the_lake_and_export_like_the_eager_join(tmp_path, landing):
    from curation.select.pool_tables import read_kept_samples
    from curation.storage.lake import Lake

    root, samples = landing
    lake = Lake(str(tmp_path / "lake"))
    lake.write("samples", samples.drop("png"))
    sel = pl.DataFrame({"uid": samples["uid"][[7, 2, 4]], "rank": [0, 1, 2], "score": [0.5, 0.4, 0.3]})
    cols = ["dataset", "shard", "key", "caption", "member"]
    got = read_kept_samples(lake, sel["uid"], cols)
    want = samples.select(["uid", *cols]).join(sel.select("uid"), on="uid", how="semi")
    assert got.columns == ["uid", *cols]
    assert got.sort("uid").equals(want.sort("uid"))
    assert read_kept_samples(lake, pl.Series([], dtype=pl.String), cols).height == 0
    a = export_subset(tmp_path / "a", sel, got, root, shard_size=2)
    b = export_subset(tmp_path / "b", sel, want, root, shard_size=2)
    assert a["n"] == b["n"] == 3 and a["n_shards"] == b["n_shards"] == 2
    for name in ("uids.npy", "manifest.parquet", "shards/00000.tar", "shards/00001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    man = pl.read_parquet(tmp_path / "a" / "manifest.parquet")
    assert man["rank"].to_list() == [0, 1, 2] and man["uid"].to_list() == sel["uid"].to_list()


def test_manifest_at_scale_is_the_join_in_rank_order_whatever_the_input_order(tmp_path):
    """120k kept rows, the selection in no rank order and the samples shuffled: the manifest holds
    exactly the selection joined with its samples rows, sorted by rank; uids.npy all kept uids."""
    rng = np.random.default_rng(0)
    n, k = 300_000, 120_000
    uids = [f"{j:032x}" for j in rng.permutation(10 * n)[:n]]
    samples = pl.DataFrame({"uid": uids, "shard": [f"s{j % 97:03d}" for j in range(n)],
                            "key": [f"{j:09d}" for j in range(n)], "caption": [f"caption {j}" for j in range(n)]})
    pick = rng.permutation(n)[:k]
    sel = pl.DataFrame({"uid": samples["uid"].gather(pick), "rank": rng.permutation(k), "score": rng.random(k)})
    kept = samples.join(sel.select("uid"), on="uid", how="semi").sample(fraction=1.0, shuffle=True, seed=1)
    stats = export_subset(tmp_path / "o", sel, kept, tmp_path, write_shards=False)
    assert stats["n"] == k and stats["n_shards"] == 0
    want = sel.join(samples, on="uid", how="left").sort("rank").select(["uid", "shard", "key", "caption", "rank", "score"])
    got = pl.read_parquet(tmp_path / "o" / "manifest.parquet")
    assert got.equals(want)
    assert u128_to_uids(np.load(tmp_path / "o" / "uids.npy")) == sorted(sel["uid"].to_list())


def test_uid_file_from_the_pool_order_equals_the_one_from_the_selection(tmp_path):
    """``kept_uids``: the uid file made from the kept uids in pool order (a pool read sorted by
    uid: no sort), or in any other order, is the file made from the selection's own uids, byte
    for byte; a count that is not the selection's is refused."""
    from curation.ingest.ids import uid_strings
    from curation.select.export import kept_in_pool_order

    rng = np.random.default_rng(3)
    n, k = 5_000, 2_000
    pool_uids = np.sort(uid_strings([f"{j:032x}" for j in rng.permutation(10 * n)[:n]]))  # S32, sorted
    index = rng.permutation(n)[:k]  # the selection's rows in the pool, in rank order
    sel = pl.DataFrame({"uid": pool_uids[index].astype(str), "rank": np.arange(k), "score": rng.random(k)})
    samples = pl.DataFrame({"uid": sel["uid"], "shard": ["s0"] * k, "key": [f"{j:05d}" for j in range(k)],
                            "caption": ["c"] * k})
    export_subset(tmp_path / "ref", sel, samples, tmp_path, write_shards=False)
    ref = (tmp_path / "ref" / "uids.npy").read_bytes()
    in_pool_order = kept_in_pool_order(pool_uids, index)
    assert bool(np.all(in_pool_order[1:] > in_pool_order[:-1])) and len(in_pool_order) == k
    for name, kept in (("pool", in_pool_order), ("shuffled", in_pool_order[rng.permutation(k)])):
        export_subset(tmp_path / name, sel, samples, tmp_path, write_shards=False, kept_uids=kept)
        assert (tmp_path / name / "uids.npy").read_bytes() == ref
    with pytest.raises(ValueError, match="kept_uids"):
        export_subset(tmp_path / "bad", sel, samples, tmp_path, write_shards=False, kept_uids=in_pool_order[:-1])
