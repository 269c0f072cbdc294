"""Fault injection on the daemon's path (issue 12, cases 2 and 5, and the SIGKILL re-runs).

The landing sensor's runs execute ``shard_ingest_job`` with Dagster's multiprocess executor
(one subprocess per step) in a separate run-worker process, against the shipped instance
config (``dagster_home/dagster.yaml``: LocalRunLauncher, run monitoring, run retries). This
test does exactly that with ``dagster job execute`` in a subprocess, on a one-shard dataset:

1. a run is SIGKILLed (its whole process group, as the OOM killer or a power cut would) while
   the ``samples`` step runs; run monitoring's worker health check marks it FAILED;
2. the re-run is SIGKILLed while ``embeddings`` runs and left STARTED: the
   ``curate_after_ingest`` sensor does not wait on it;
3. the final re-run succeeds (embedding with DataLoader worker processes) and every table
   equals the tables of a clean in-process run.

A second test leaves recovery to the daemon alone (``dagster-daemon run`` with the shipped
config, no manual step after the kill): the queued run's worker is SIGKILLed, run monitoring
marks it FAILED, run retries launch it again, and the retry's tables equal a clean run's.

These are the slowest tests of the fault suite (about four step-process start-ups per run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef

from curation.storage.lake import Lake, list_column_to_matrix
from daemon_helpers import run_env, shipped_dagster_home, start_daemon, stop, wait_for

REPO = Path(__file__).resolve().parents[1]
KEY = "emoji-00000"


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    from curation.ingest.emoji_dataset import build_default_dataset

    home = tmp_path_factory.mktemp("fault_home")
    build_default_dataset(home, limit=12, samples_per_shard=500, seed=0, workers=1)
    assert sorted(p.name for p in (home / "landing" / "emoji").iterdir()) == ["00000.parquet", "00000.tar"]
    return home


def _shipped_instance(tmp_path, tiny_home):
    """A data home with the tiny landing shards and a DAGSTER_HOME with the shipped dagster.yaml
    (the daemon's config), its instance and the shard partition registered."""
    from assets.partitions import SHARDS

    home = tmp_path / "home"
    shutil.copytree(tiny_home / "landing", home / "landing")
    dagster_home = shipped_dagster_home(tmp_path / "dagster_home")
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    instance.add_dynamic_partitions(SHARDS, [KEY])
    return home, dagster_home, instance


def _launch(home: Path, dagster_home: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "dagster", "job", "execute",
        "-m", "assets.definitions", "-a", "defs", "-j", "shard_ingest_job",
        "--tags", json.dumps({"dagster/partition": KEY}),
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=run_env(home, dagster_home), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _latest_run(instance: DagsterInstance):
    runs = instance.get_runs(RunsFilter(job_name="shard_ingest_job"), limit=1)
    return runs[0] if runs else None


def _kill_during_step(home, dagster_home, instance, step: str, after_s: float, known: set, attempts: int = 4):
    """Launch runs until one is SIGKILLed while ``step`` runs (a fast step can finish before the
    kill lands; such a run still was killed, and the next attempt re-runs over what it left)."""
    for _ in range(attempts):
        run_id, inside = _kill_when_step_starts(_launch(home, dagster_home), instance, step, after_s, known)
        known.add(run_id)
        if inside:
            return run_id
    raise AssertionError(f"{step} always finished before the SIGKILL landed ({attempts} attempts)")


def _kill_when_step_starts(proc: subprocess.Popen, instance: DagsterInstance, step: str, after_s: float, known: set):
    """SIGKILL the run's whole process group once ``step`` has started (+ ``after_s``).

    Returns ``(run_id, killed inside the step)``.
    """
    deadline = time.time() + 540
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {step} could be killed: {proc.stderr.read()[-2000:]}")
        run = _latest_run(instance)
        if run is not None and run.run_id not in known:
            started = [
                e for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
                if e.dagster_event.step_key == step
            ]
            if started:
                time.sleep(after_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                done = [
                    e for e in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)
                    if e.dagster_event.step_key == step
                ]
                return run.run_id, not done
        time.sleep(0.02)
    raise AssertionError(f"{step} never started")


def _tables(lake_root: Path) -> dict[str, pl.DataFrame]:
    lake = Lake(str(lake_root))
    out = {
        "samples": lake.read("samples").sort("uid"),
        "quarantine": lake.read("quarantine").sort("key", "stage", "reason"),
    }
    emb = lake.read("embeddings").sort("uid")
    out["embeddings"] = emb
    return out


@pytest.fixture(scope="module")
def reference(tiny_home, tmp_path_factory) -> dict[str, pl.DataFrame]:
    """The tables of a clean in-process run (shared by the tests of this module)."""
    ref = _reference(tiny_home, tmp_path_factory.mktemp("reference"))
    assert ref["samples"].height > 20 and ref["embeddings"].height == ref["samples"].height
    return ref


def _reference(tiny_home: Path, tmp_path: Path) -> dict[str, pl.DataFrame]:
    """A clean in-process run of the same assets on a copy of the landing zone."""
    from assets.embed import ASSETS as EMBED_ASSETS
    from assets.ingest import ASSETS as INGEST_ASSETS
    from assets.partitions import SHARDS
    from resources import ComputeResource, DatasetsResource, EncoderResource, LakeResource

    lake_root = tmp_path / "ref_lake"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARDS, [KEY])
    res = dg.materialize(
        [*INGEST_ASSETS, *EMBED_ASSETS],
        partition_key=KEY,
        instance=instance,
        resources={
            "lake": LakeResource(root=str(lake_root), artifacts_root=str(tmp_path / "ref_artifacts")),
            "datasets": DatasetsResource(landing=str(tiny_home / "landing"), eval_root=str(tiny_home / "eval")),
            "compute": ComputeResource(device="cpu", num_workers=0),
            "encoder": EncoderResource(),
        },
    )
    assert res.success
    return _tables(lake_root)


def _assert_tables_equal(got: dict[str, pl.DataFrame], ref: dict[str, pl.DataFrame]) -> None:
    """Nothing lost, nothing duplicated: samples and quarantine equal, embeddings to 1e-5."""
    assert got["samples"].equals(ref["samples"])
    assert got["quarantine"].equals(ref["quarantine"])
    assert got["embeddings"]["uid"].to_list() == ref["embeddings"]["uid"].to_list()
    for col in ("image_emb", "text_emb"):
        a = list_column_to_matrix(got["embeddings"][col])
        b = list_column_to_matrix(ref["embeddings"][col])
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sigkill_during_samples_and_embeddings_then_rerun_equals_a_clean_run(tiny_home, reference, tmp_path):
    from assets import sensors
    from assets.run_health import run_worker_dead
    from dagster._daemon.monitoring.run_monitoring import monitor_started_run

    ref = reference

    home, dagster_home, instance = _shipped_instance(tmp_path, tiny_home)
    known: set = set()

    # 1. killed while the samples step runs; run monitoring finds the dead worker
    run1 = _kill_during_step(home, dagster_home, instance, "samples", 0.0, known)
    rec = instance.get_run_records(RunsFilter(run_ids=[run1]))[0]
    assert rec.dagster_run.status == DagsterRunStatus.STARTED, "a SIGKILLed run stays STARTED by itself"
    assert run_worker_dead(instance, rec.dagster_run)
    monitor_started_run(instance, None, rec, logging.getLogger("run_monitoring"))
    assert instance.get_run_by_id(run1).status == DagsterRunStatus.FAILURE

    # 2. the re-run is killed while embedding, and left STARTED (no daemon here)
    run2 = _kill_during_step(home, dagster_home, instance, "embeddings", 1.0, known)
    assert instance.get_run_by_id(run2).status == DagsterRunStatus.STARTED

    # 3. the final re-run, multiprocess executor, DataLoader workers (ComputeResource default: 2)
    proc = _launch(home, dagster_home)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run3 = _latest_run(instance)
    assert run3.status == DagsterRunStatus.SUCCESS
    steps = {
        e.dagster_event.step_key
        for e in instance.all_logs(run3.run_id, of_type=DagsterEventType.STEP_SUCCESS)
    }
    assert {"raw_shards", "samples", "embeddings"} <= steps
    mats = [
        e.dagster_event.event_specific_data.materialization
        for e in instance.all_logs(run3.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    ]
    emb_meta = next(m.metadata for m in mats if m.asset_key.path[-1] == "embeddings")
    assert "multiprocess" in " ".join(
        e.message or "" for e in instance.all_logs(run3.run_id, of_type=DagsterEventType.ENGINE_EVENT)
    )
    if "num_workers" in emb_meta:
        assert emb_meta["num_workers"].value >= 1

    # the tables equal a clean run's: nothing lost, nothing duplicated
    _assert_tables_equal(_tables(home / "lake"), ref)

    # the automation does not wait on the dead STARTED run(s)
    out = sensors.curate_after_ingest(dg.build_sensor_context(instance=instance, cursor=None))
    assert isinstance(out, dg.RunRequest), getattr(out, "skip_message", out)


def test_the_daemon_retries_a_sigkilled_run_and_the_retry_equals_a_clean_run(tiny_home, reference, tmp_path):
    """No manual step after the kill: ``dagster-daemon run`` with the shipped dagster.yaml
    dequeues a shard run, its worker is SIGKILLed (with its step processes) while ``samples``
    runs, run monitoring marks it FAILED, run retries launch it again (from failure, same
    partition), and the retry's tables equal a clean run's."""
    from assets.run_health import run_worker_pid
    from net_helpers import process_tree

    home, dagster_home, instance = _shipped_instance(tmp_path, tiny_home)
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    assert instance.run_monitoring_enabled
    env = run_env(home, dagster_home, CURATION_AUTOMATION="off")  # only the run this test submits, no sensor runs

    # the run is submitted to the queue as a sensor's run would be (same code location)
    launch = subprocess.run(
        [sys.executable, "-m", "dagster", "job", "launch", "-w", str(REPO / "workspace.yaml"),
         "-j", "shard_ingest_job", "--tags", json.dumps({"dagster/partition": KEY})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    (run1,) = instance.get_runs(RunsFilter(job_name="shard_ingest_job"))
    assert run1.status == DagsterRunStatus.QUEUED and run1.remote_job_origin is not None

    daemon = start_daemon(env)
    try:
        def samples_started():
            return any(
                e.dagster_event.step_key == "samples"
                for e in instance.all_logs(run1.run_id, of_type=DagsterEventType.STEP_START)
            )

        wait_for("the samples step of the first run", samples_started, 300, daemon)
        worker = run_worker_pid(instance, run1.run_id)
        assert worker is not None and worker != daemon.pid
        for pid in process_tree(worker):  # the run worker and its step processes, as an OOM kill of its cgroup
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def retried_and_done():
            runs = instance.get_runs(RunsFilter(tags={"dagster/parent_run_id": run1.run_id}))
            return runs if runs and runs[0].status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED) else None

        (retry,) = wait_for("the automatic retry to finish", retried_and_done, 420, daemon)
    finally:
        stop(daemon)

    failed = instance.get_run_by_id(run1.run_id)
    assert failed.status == DagsterRunStatus.FAILURE
    assert failed.tags.get("dagster/will_retry") == "true"
    assert failed.tags.get("dagster/auto_retry_run_id") == retry.run_id
    assert retry.status == DagsterRunStatus.SUCCESS
    assert retry.tags["dagster/retry_number"] == "1" and retry.tags["dagster/root_run_id"] == run1.run_id
    assert retry.tags["dagster/partition"] == KEY and retry.job_name == "shard_ingest_job"
    # one retry, nothing else launched
    assert {r.run_id for r in instance.get_runs(RunsFilter(job_name="shard_ingest_job"))} == {run1.run_id, retry.run_id}
    _assert_tables_equal(_tables(home / "lake"), reference)
