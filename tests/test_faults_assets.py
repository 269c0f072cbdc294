"""Fault injection at the asset level (issue 12): deleted shards, local Ray exposure."""

from __future__ import annotations

import io
import tarfile

import dagster as dg
import polars as pl
from PIL import Image

from assets.checks.ingest import CHECKS, key_accounting
from assets.ingest import ASSETS
from assets.partitions import SHARDS
from assets.sensors import landing_sensor
from curation.storage.lake import Lake

KEY = "ds-00000"


def _shard(path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="PNG")
    png = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key in ("a", "b", "c"):
            for name, data in ((f"{key}.png", png), (f"{key}.txt", f"caption {key}".encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_deleted_shard_is_tombstoned_visibly(lake_resources, tmp_path):
    landing = tmp_path / "landing"
    tar = landing / "ds" / "00000.tar"
    _shard(tar)
    res = lake_resources(landing=landing)
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        return landing_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"datasets": res["datasets"]}))

    first = tick(None)
    instance.add_dynamic_partitions(SHARDS, [KEY])
    r = dg.materialize([*ASSETS, *CHECKS], partition_key=KEY, resources=res, instance=instance)
    assert r.success
    lake = Lake(res["lake"].root)
    assert lake.read("samples").height == 3

    tar.unlink()
    gone = tick(first.cursor)
    (req,) = gone.run_requests
    assert req.partition_key == KEY and req.tags["curation/trigger"] == "landing_sensor_deleted"

    r = dg.materialize([*ASSETS, *CHECKS], partition_key=KEY, resources=res, instance=instance)
    assert r.success
    md = {e.materialization.asset_key.path[-1]: e.materialization.metadata for e in r.get_asset_materialization_events()}
    assert md["samples"]["tombstoned"].value == 3 and md["raw_shards"]["status"].value == "deleted"
    assert lake.read("samples").height == 0
    q = lake.read("quarantine").sort("key")
    assert q["key"].to_list() == ["a", "b", "c"] and set(q["reason"]) == {"shard_deleted"}
    assert all("sha256" in d for d in q["detail"])
    check = key_accounting(res["lake"], res["datasets"], KEY)
    assert check.passed and check.metadata["tombstoned_keys"].value == 3

    # the shard comes back with the same bytes: it is ingested again (a new generation)
    _shard(tar)
    back = tick(gone.cursor)
    (req2,) = back.run_requests
    assert req2.run_key not in {r.run_key for r in first.run_requests}


def test_local_ray_is_loopback_only_and_token_protected():
    import os

    from curation.engine.executor import DistributedConfig, RayExecutor

    ex = RayExecutor(DistributedConfig(address="local", num_cpus=1))
    try:
        ray = ex._ensure_ray()
        nodes = ray.nodes()
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert os.environ.get("RAY_AUTH_MODE") == "token" and len(os.environ.get("RAY_AUTH_TOKEN", "")) >= 32
        assert ex.map(lambda x: x + 1, [1, 2]) == [2, 3]
    finally:
        ex.shutdown()
    assert "RAY_AUTH_TOKEN" not in os.environ


def test_quarantine_table_keeps_partitions_of_concurrent_stages(tmp_path):
    """The ingest and embed stages share quarantine partitions; a stage rewrite touches only its rows."""
    lake = Lake(str(tmp_path / "lake"))
    row = {"dataset": "ds", "shard": KEY, "key": "k", "detail": ""}
    lake.write("quarantine", pl.DataFrame([{**row, "stage": "embed", "reason": "decode_error"}]), partition=KEY, where={"stage": "embed"})
    lake.write("quarantine", pl.DataFrame([{**row, "stage": "ingest", "reason": "empty_caption"}]), partition=KEY, where={"stage": "ingest"})
    lake.write("quarantine", pl.DataFrame([{**row, "stage": "ingest", "reason": "empty_caption"}]), partition=KEY, where={"stage": "ingest"})
    assert sorted(lake.read("quarantine")["stage"].to_list()) == ["embed", "ingest"]
