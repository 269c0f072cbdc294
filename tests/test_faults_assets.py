"""Fault injection at the asset level (issue 12): deleted shards, local Ray exposure."""

from __future__ import annotations

import io
import os
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


def test_local_ray_listens_on_loopback_only_and_requires_a_token():
    """A local Ray instance started in a fresh process (as a Dagster step process starts it)
    accepts no connection from another interface: every socket its process tree (driver, GCS,
    raylet, agents, workers) listens on is bound to loopback. It also requires a per-instance
    token, which leaves the environment on shutdown (docs/reliability.md, case 7)."""
    import subprocess
    import sys
    from pathlib import Path

    from net_helpers import is_loopback, listening_sockets

    code = (
        "import os, sys\n"
        "from curation.engine.executor import DistributedConfig, RayExecutor\n"
        "ex = RayExecutor(DistributedConfig(address='local', num_cpus=1))\n"
        "ray = ex._ensure_ray()\n"
        "print('NODES', sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\n"
        "print('MODE', os.environ.get('RAY_AUTH_MODE'), len(os.environ.get('RAY_AUTH_TOKEN', '')))\n"
        "print('MAP', ex.map(abs, [-1, -2]), flush=True)\n"
        "sys.stdin.readline()\n"  # the test inspects the sockets now
        "ex.shutdown()\n"
        "print('AFTER', 'RAY_AUTH_TOKEN' in os.environ, os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ENABLE_WINDOWS_OR_OSX"))}
    env["PYTHONPATH"] = f"{repo}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = {}
        for line in proc.stdout:
            head, _, rest = line.rstrip("\n").partition(" ")
            lines[head] = rest
            if head == "MAP":
                break
        assert lines.get("MAP") == "[1, 2]", (lines, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        sockets = listening_sockets(proc.pid)
        exposed = [s for s in sockets if not is_loopback(s[1])]
        assert len({pid for *_, pid in sockets}) >= 3, sockets  # driver, GCS, raylet at least: not vacuous
        assert exposed == [], f"listening on non-loopback addresses: {exposed}"
        out, err = proc.communicate("\n", timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    for line in out.splitlines():
        head, _, rest = line.partition(" ")
        lines[head] = rest
    assert lines["NODES"] == "['127.0.0.1']"
    assert lines["MODE"].split()[0] == "token"  # (Ray may consume RAY_AUTH_TOKEN from the env)
    assert lines["AFTER"] == "False None"


def test_quarantine_table_keeps_partitions_of_concurrent_stages(tmp_path):
    """The ingest and embed stages share quarantine partitions; a stage rewrite touches only its rows."""
    lake = Lake(str(tmp_path / "lake"))
    row = {"dataset": "ds", "shard": KEY, "key": "k", "detail": ""}
    lake.write("quarantine", pl.DataFrame([{**row, "stage": "embed", "reason": "decode_error"}]), partition=KEY, where={"stage": "embed"})
    lake.write("quarantine", pl.DataFrame([{**row, "stage": "ingest", "reason": "empty_caption"}]), partition=KEY, where={"stage": "ingest"})
    lake.write("quarantine", pl.DataFrame([{**row, "stage": "ingest", "reason": "empty_caption"}]), partition=KEY, where={"stage": "ingest"})
    assert sorted(lake.read("quarantine")["stage"].to_list()) == ["embed", "ingest"]
