"""Ingest assets, checks and the landing sensor, materialized on a temp lake."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time

import dagster as dg
import polars as pl
import pytest
from dagster import DagsterInstance, build_sensor_context, materialize

from assets.checks.ingest import CHECKS
from assets.ingest import ASSETS
from assets.partitions import SHARDS
from assets.sensors import landing_sensor
from curation.storage.lake import Lake
from curation.ingest.shards import find_shards, list_keys

INGEST = [*ASSETS, *CHECKS]


def _copy_landing(src_home, dst):
    shutil.copytree(src_home / "landing", dst)
    return dst


def _run(resources, instance, key):
    result = materialize(INGEST, partition_key=key, instance=instance, resources=resources)
    assert result.success
    return result


def _check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def test_raw_shards_and_samples_on_the_small_dataset(small_dataset, lake_resources, tmp_path):
    landing = _copy_landing(small_dataset, tmp_path / "landing")
    res = lake_resources(landing=landing)
    instance = DagsterInstance.ephemeral()
    keys = list(find_shards(landing))
    instance.add_dynamic_partitions(SHARDS, keys)
    result = _run(res, instance, keys[0])

    mats = {
        e.materialization.asset_key.path[-1]: e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    raw = mats["raw_shards"]
    assert raw["is_tar"].value is True and raw["members"].value == 3 * mats["samples"]["rows"].value
    assert len(raw["sha256"].value) == 64
    sm = mats["samples"]
    assert sm["rows"].value == sm["keys_seen"].value == 100 and sm["quarantined"].value == 0
    assert "| key | caption |" in sm["preview"].value

    checks = _check_results(result)
    assert set(checks) == {"every_key_accounted_for", "uids_unique", "captions_within_policy"}
    assert all(c.passed for c in checks.values())

    lake = Lake(res["lake"].root)
    df = lake.read("samples", partitions=[keys[0]])
    assert df.height == 100 and df["uid"].n_unique() == 100
    assert set(df["shard"]) == {keys[0]} and set(df["dataset"]) == {"emoji"}
    assert set(df["format"]) == {"png"} and (df["width"] == 72).all()
    # the rest of the partitions, then everything is accounted for
    for k in keys[1:]:
        _run(res, instance, k)
    allrows = lake.read("samples")
    assert allrows.height == sum(len(list_keys(p)) for p in find_shards(landing).values())
    assert lake.partitions("samples") == keys


def test_rematerializing_is_idempotent_and_keeps_embed_quarantine(small_dataset, lake_resources, tmp_path):
    landing = _copy_landing(small_dataset, tmp_path / "landing")
    res = lake_resources(landing=landing)
    instance = DagsterInstance.ephemeral()
    keys = list(find_shards(landing))
    instance.add_dynamic_partitions(SHARDS, keys)
    lake = Lake(res["lake"].root)
    # the embeddings stage already quarantined one sample of this shard
    embed_row = pl.DataFrame(
        {"dataset": ["emoji"], "shard": [keys[0]], "key": ["000000007"], "stage": ["embed"],
         "reason": ["preprocess_failed"], "detail": ["test"]}
    )
    lake.write("quarantine", embed_row, partition=keys[0], where={"stage": "embed"})
    _run(res, instance, keys[1])
    first = lake.read("samples").sort("uid")
    for _ in range(3):
        _run(res, instance, keys[0])
    after = lake.read("samples").sort("uid")
    assert after.height == first.height + 100
    assert after.filter(pl.col("shard") == keys[0])["uid"].n_unique() == 100
    assert after.filter(pl.col("shard") == keys[1]).equals(first.filter(pl.col("shard") == keys[1]))
    q = lake.read("quarantine")
    assert q.filter(pl.col("stage") == "embed").height == 1  # the other stage's rows survive


def _bad_tar_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    img = buf.getvalue()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for name, data in [("a.png", img), ("a.txt", b"ok"), ("b.png", b"junk"), ("b.txt", b"x"),
                           ("c.png", img), ("c.txt", b"\xff\xfe"), ("d.txt", b"no image")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def test_bad_shards_are_reported_not_crashed(lake_resources, tmp_path):
    landing = tmp_path / "landing" / "web"
    landing.mkdir(parents=True)
    (landing / "00000.tar").write_bytes(b"<html>503 Service Unavailable</html>")
    (landing / "00001.tar").write_bytes(_bad_tar_bytes())
    res = lake_resources(landing=tmp_path / "landing")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARDS, ["web-00000", "web-00001"])

    r0 = _run(res, instance, "web-00000")
    md = {e.materialization.asset_key.path[-1]: e.materialization.metadata for e in r0.get_asset_materialization_events()}
    assert md["raw_shards"]["is_tar"].value is False and md["raw_shards"]["status"].value == "not a tar"
    assert md["samples"]["rows"].value == 0 and md["samples"]["quarantine_not_a_tar"].value == 1
    assert all(c.passed for c in r0.get_asset_check_evaluations())

    r1 = _run(res, instance, "web-00001")
    md = {e.materialization.asset_key.path[-1]: e.materialization.metadata for e in r1.get_asset_materialization_events()}
    assert md["samples"]["quarantine_reasons"].value == {
        "invalid_utf8_caption": 1, "missing_image": 1, "unsupported_format": 1
    }
    assert md["samples"]["rows"].value == 1 and md["samples"]["quarantine_fraction"].value == 0.75
    checks = _check_results(r1)
    assert checks["every_key_accounted_for"].passed
    assert checks["every_key_accounted_for"].metadata["keys_seen"].value == 4
    q = Lake(res["lake"].root).read("quarantine")
    assert sorted(q["reason"]) == ["invalid_utf8_caption", "missing_image", "not_a_tar", "unsupported_format"]


def test_accounting_check_fails_when_rows_are_lost(small_dataset, lake_resources, tmp_path):
    landing = _copy_landing(small_dataset, tmp_path / "landing")
    res = lake_resources(landing=landing)
    instance = DagsterInstance.ephemeral()
    key = next(iter(find_shards(landing)))
    instance.add_dynamic_partitions(SHARDS, [key])
    _run(res, instance, key)
    lake = Lake(res["lake"].root)
    lake.table("samples").delete("key = '000000003'")  # a row silently lost downstream
    from assets.checks.ingest import key_accounting

    out = key_accounting(res["lake"], res["datasets"], key)
    assert not out.passed
    assert out.metadata["missing_keys"].value == ["000000003"]
    assert out.metadata["keys_seen"].value == 100 and out.metadata["observed_accounted"].value == 99
    # a row of a key the shard does not have is caught too
    extra = lake.read("samples", partitions=[key]).head(1).with_columns(pl.lit("zzz").alias("key"))
    lake.write("samples", pl.concat([lake.read("samples", partitions=[key]), extra]), partition=key)
    out = key_accounting(res["lake"], res["datasets"], key)
    assert not out.passed and out.metadata["unexpected_keys"].value == ["zzz"]


# --------------------------------------------------------------------------- the sensor


def test_landing_sensor_adds_partitions_and_requests_runs(small_dataset, lake_resources, tmp_path):
    landing = tmp_path / "landing"
    res = lake_resources(landing=landing)
    instance = DagsterInstance.ephemeral()

    def tick(cursor):
        ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"datasets": res["datasets"]})
        return landing_sensor(ctx)

    out = tick(None)
    assert isinstance(out, dg.SkipReason) and "no shards" in out.skip_message

    _copy_landing(small_dataset, landing)
    out = tick(None)
    keys = list(find_shards(landing))
    assert [r.partition_key for r in out.run_requests] == keys
    assert len({r.run_key for r in out.run_requests}) == len(keys)
    (add,) = out.dynamic_partitions_requests
    assert add.partitions_def_name == SHARDS and list(add.partition_keys) == keys
    # the same tick again gives the same run keys (deterministic)
    again = tick(None)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in out.run_requests]

    instance.add_dynamic_partitions(SHARDS, keys)
    out2 = tick(out.cursor)
    assert not out2.run_requests and "no new or changed shards" in out2.skip_reason.skip_message

    # a new shard lands, and an existing one is replaced
    new = landing / "emoji" / "00099.tar"
    shutil.copy(landing / "emoji" / "00000.tar", new)
    p1 = landing / "emoji" / "00001.tar"
    st = p1.stat()
    os.utime(p1, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = tick(out2.cursor)  # a touch changes no byte: content-addressed, nothing to ingest
    assert sorted(r.partition_key for r in touched.run_requests) == ["emoji-00099"]
    shutil.copy(landing / "emoji" / "00002.tar", p1)
    out3 = tick(out2.cursor)
    assert sorted(r.partition_key for r in out3.run_requests) == ["emoji-00001", "emoji-00099"]
    assert list(out3.dynamic_partitions_requests[0].partition_keys) == ["emoji-00099"]
    rk = {r.partition_key: r.run_key for r in out3.run_requests}
    assert rk["emoji-00001"] != next(r.run_key for r in out.run_requests if r.partition_key == "emoji-00001")


def test_landing_sensor_skips_shards_already_ingested(small_dataset, lake_resources, tmp_path):
    landing = _copy_landing(small_dataset, tmp_path / "landing")
    res = lake_resources(landing=landing)
    instance = DagsterInstance.ephemeral()
    keys = list(find_shards(landing))
    instance.add_dynamic_partitions(SHARDS, keys)
    _run(res, instance, keys[0])
    ctx = build_sensor_context(instance=instance, cursor=None, resources={"datasets": res["datasets"]})
    out = landing_sensor(ctx)
    assert [r.partition_key for r in out.run_requests] == keys[1:]
    assert not out.dynamic_partitions_requests


# --------------------------------------------------------------------------- e2e


@pytest.mark.e2e
def test_full_default_dataset_every_sample_accounted_for(lake_resources, tmp_path):
    from curation.ingest.emoji_dataset import build_default_dataset

    t0 = time.perf_counter()
    stats = build_default_dataset(tmp_path / "home")
    res = lake_resources(landing=tmp_path / "home" / "landing")
    instance = DagsterInstance.ephemeral()
    shards = find_shards(tmp_path / "home" / "landing")
    assert len(shards) == stats.pool_shards
    instance.add_dynamic_partitions(SHARDS, list(shards))
    for key in shards:
        result = _run(res, instance, key)
        assert all(c.passed for c in result.get_asset_check_evaluations())
    lake = Lake(res["lake"].root)
    df = lake.read("samples", columns=["uid", "key", "shard"])
    assert df.height == stats.pool_samples
    assert df["uid"].n_unique() == df.height
    assert not lake.exists("quarantine") or lake.read("quarantine").height == 0
    manifest = pl.read_parquet(stats.eval_dir / "manifest.parquet")
    assert manifest.height == stats.eval_samples > 0
    print(f"full dataset: {stats.as_dict()}; build + ingest {time.perf_counter() - t0:.1f} s")
