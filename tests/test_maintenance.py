"""Lake maintenance: the layout compaction + vacuum of curation.select.maintenance, and the
lake_maintenance_job / maintenance_schedule that run it unattended."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, build_schedule_context
from dagster._core.instance.ref import InstanceRef
from dagster._core.utils import make_new_run_id

from curation.ingest.ids import make_uid
from curation.select.layout import (
    LAYOUT_TABLE,
    LayoutConfig,
    build_layout,
    dedup_scores_by_bucket,
    fit_centroids,
    layout_files_per_bucket,
    update_layout,
    write_dedup_scores,
)
from curation.select.maintenance import maintain_lake
from curation.storage.lake import Lake, matrix_to_list_column
from daemon_helpers import run_env, shipped_dagster_home

D, K = 16, 6
REPO = Path(__file__).resolve().parents[1]


def _shard(lake: Lake, stem: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).standard_normal((K, D))
    x = centers[rng.integers(0, K, n)] + 0.5 * rng.standard_normal((n, D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    key = f"syn-{stem}"
    lake.write("embeddings", pa.table({
        "uid": [make_uid("syn", stem, str(i)) for i in range(n)], "shard": [key] * n,
        "image_emb": matrix_to_list_column(x), "encoder": ["test"] * n}), partition=key)


def _laid_out(root: Path, shards: int, rows: int, cfg: LayoutConfig) -> tuple[Lake, np.ndarray]:
    """A lake of ``shards`` synthetic shards of ``rows`` rows, laid out by cluster with ``cfg``."""
    lake = Lake(str(root))
    for i in range(shards):
        _shard(lake, f"{i:05d}", rows, i)
    cent, _ = fit_centroids(lake, K, niter=5)
    build_layout(lake, cent, cfg)
    return lake, cent


def _data_files(lake: Lake, table: str) -> set[str]:
    root = lake.uri(table)
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) if "_delta_log" not in d
            for f in fs if f.endswith(".parquet")}


@pytest.fixture
def updated_lake(tmp_path):
    """A layout written in small flushes, then two incremental updates: several files per bucket."""
    cfg = LayoutConfig(clusters_per_bucket=2, flush_rows=250, spill=False)
    lake, cent = _laid_out(tmp_path / "lake", 3, 300, cfg)
    write_dedup_scores(lake, dedup_scores_by_bucket(lake, config=cfg, incremental=False))
    for i in (3, 4):
        _shard(lake, f"{i:05d}", 200, i)
        update_layout(lake, cent, cfg)
        write_dedup_scores(lake, dedup_scores_by_bucket(lake, config=cfg))
    return lake, cent, cfg


def test_maintenance_compacts_the_layout_then_vacuums_what_the_rewrites_left(updated_lake):
    lake, cent, cfg = updated_lake
    counts = layout_files_per_bucket(lake)
    assert max(counts.values()) >= 3
    rows = lake.read(LAYOUT_TABLE, columns=["uid", "cluster_id"]).sort("uid")
    scores = lake.read("dedup_scores").sort("uid")
    on_disk = {t: _data_files(lake, t) for t in (LAYOUT_TABLE, "dedup_scores")}
    # a dry run reports the buckets and what a vacuum would free, and changes nothing
    dry = maintain_lake(lake, retention_hours=0, dry_run=True)
    assert dry.compacted_buckets == sorted(b for b, c in counts.items() if c >= 2)
    assert dry.layout_files_after == dry.layout_files_before == sum(counts.values())
    dry_freed = {v.table: v.files for v in dry.vacuums}
    assert dry_freed["dedup_scores"] == 2  # the two overwritten versions of the scores
    assert layout_files_per_bucket(lake) == counts and _data_files(lake, "dedup_scores") == on_disk["dedup_scores"]
    # a week's retention: the compaction runs, nothing written moments ago is deleted
    kept = maintain_lake(lake)
    assert kept.compacted_buckets == dry.compacted_buckets and kept.files_vacuumed == 0
    assert all(c == 1 for c in layout_files_per_bucket(lake).values())
    assert kept.layout_files_after == len(counts)
    assert _data_files(lake, LAYOUT_TABLE) >= on_disk[LAYOUT_TABLE]  # the old files are still there
    # retention 0: every file no commit references goes, the referenced ones stay, rows unchanged
    rep = maintain_lake(lake, retention_hours=0)
    assert rep.compacted_buckets == [] and rep.files_vacuumed > 0 and rep.bytes_freed > 0
    by_table = {v.table: v for v in rep.vacuums}
    assert by_table[LAYOUT_TABLE].files == sum(counts.values()) and by_table["dedup_scores"].files == 2
    referenced = {f for f in lake.table(LAYOUT_TABLE).file_uris()}
    assert {os.path.join(lake.uri(LAYOUT_TABLE), f) for f in _data_files(lake, LAYOUT_TABLE)} == referenced
    assert lake.read(LAYOUT_TABLE, columns=["uid", "cluster_id"]).sort("uid").equals(rows)
    assert lake.read("dedup_scores").sort("uid").equals(scores)
    # the next update after maintenance is still exact (scores equal a full recompute)
    _shard(lake, "00005", 150, 5)
    update_layout(lake, cent, cfg)
    du = dedup_scores_by_bucket(lake, config=cfg)
    full = dedup_scores_by_bucket(lake, config=cfg, incremental=False)
    assert du.mode == "incremental" and du.frame["uid"].equals(full.frame["uid"])
    np.testing.assert_allclose(du.max_sim, full.max_sim, atol=1e-6, rtol=0)


def test_maintenance_validates_its_settings_and_reports_a_skipped_compaction(updated_lake):
    lake, _, _ = updated_lake
    with pytest.raises(ValueError, match="compact_min_files: got 1"):
        maintain_lake(lake, compact_min_files=1)
    with pytest.raises(ValueError, match="retention_hours: got -1"):
        maintain_lake(lake, retention_hours=-1)
    with pytest.raises(ValueError, match=r"unknown tables \['nope'\]"):
        maintain_lake(lake, tables=["nope"])
    before = layout_files_per_bucket(lake)
    rep = maintain_lake(lake, skip_compaction="busy", tables=["dedup_scores"])
    assert rep.compaction_skipped == "busy" and rep.compacted_buckets == [] and layout_files_per_bucket(lake) == before
    assert [v.table for v in rep.vacuums] == ["dedup_scores"]
    assert maintain_lake(lake, compact_min_files=None, tables=[]).compaction_skipped == "compact_min_files is None"


def _run_job(instance, lake: Lake, **config):
    from assets.maintenance import lake_maintenance_job
    from resources import LakeResource

    return lake_maintenance_job.execute_in_process(
        instance=instance, resources={"lake": LakeResource(root=lake.root, artifacts_root=lake.root + "/artifacts")},
        run_config={"ops": {"maintain_lake": {"config": config}}} if config else None)


def test_maintenance_job_compacts_vacuums_and_observes_the_layout(updated_lake, tmp_path):
    from assets.jobs import pool_curation_job
    from assets.maintenance import lake_maintenance_job
    from assets.stages import LAYOUT_TAG

    lake, _, _ = updated_lake
    before = sum(layout_files_per_bucket(lake).values())
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster")) as instance:
        # a pool curation run in progress writes the layout: no compaction, the vacuum still runs
        busy = DagsterRun(job_name=pool_curation_job.name, run_id=make_new_run_id(), status=DagsterRunStatus.STARTED)
        instance.add_run(busy)
        res = _run_job(instance, lake, retention_hours=0)
        assert res.success
        out = res.output_for_node("maintain_lake")
        assert "pool_curation_job" in out["compaction_skipped"] and out["compacted_buckets"] == []
        # ... and while another run writes, files younger than an hour stay whatever the config says
        assert out["retention_hours"] == 1 and out["files_vacuumed"] == {}
        assert sum(layout_files_per_bucket(lake).values()) == before
        instance.report_run_canceled(busy)
        res = _run_job(instance, lake, retention_hours=0)
        out = res.output_for_node("maintain_lake")
        assert out["compaction_skipped"] == "" and out["layout_files"] == [before, len(layout_files_per_bucket(lake))]
        # retention 0, nothing else running: the old scores and the files the compaction replaced go
        assert out["retention_hours"] == 0
        assert out["files_vacuumed"] == {LAYOUT_TABLE: before, "dedup_scores": 2, "dedup_scores_shards": 2,
                                         "pool_by_cluster_shards": 2} and out["bytes_freed"] > 0
        meta = next(e for e in res.all_events if e.event_type_value == "STEP_OUTPUT").event_specific_data.metadata
        assert meta["buckets_compacted"].value == len(out["compacted_buckets"]) > 0
        assert meta["layout_files_after"].value == len(layout_files_per_bucket(lake))
        obs = [e for e in res.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        assert obs and obs[0].asset_key.to_user_string() == "concept_clusters"
        assert obs[0].event_specific_data.asset_observation.metadata["layout_files"].value == len(layout_files_per_bucket(lake))
        # nothing left to free: the tombstones a vacuum still lists are not counted again
        out = _run_job(instance, lake, retention_hours=0).output_for_node("maintain_lake")
        assert out["files_vacuumed"] == {} and out["bytes_freed"] == 0 and out["compacted_buckets"] == []
    assert lake_maintenance_job.tags[LAYOUT_TAG] == pool_curation_job.tags[LAYOUT_TAG] == "write"


def test_maintenance_schedule_has_a_deterministic_run_key_and_the_instance_limits_layout_writers(monkeypatch):
    from assets import schedules
    from assets.stages import LAYOUT_TAG, TRIGGER_TAG

    t = datetime(2025, 1, 5, 4, 0, tzinfo=timezone.utc)
    req = schedules.maintenance_schedule(build_schedule_context(scheduled_execution_time=t))
    assert req.run_key == "maintenance:2025-01-05T04:00:00Z" and req.tags[TRIGGER_TAG] == "schedule"
    assert schedules.maintenance_schedule.job_name == "lake_maintenance_job"
    assert schedules.maintenance_schedule.cron_schedule == schedules.DEFAULT_MAINTENANCE_CRON
    monkeypatch.setenv("CURATION_MAINTENANCE_CRON", "30 2 * * *")
    assert schedules.maintenance_cron() == "30 2 * * *"
    # the shipped instance (what the daemon's run queue reads) runs one layout writer at a time
    with tempfile.TemporaryDirectory() as d:
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(shipped_dagster_home(Path(d))))) as instance:
            queue = instance.run_coordinator.get_run_queue_config()
    assert {"key": LAYOUT_TAG, "limit": 1} in queue.tag_concurrency_limits and queue.max_concurrent_runs == 2


def test_cli_maintain_runs_the_job_on_the_instance_and_prints_what_it_did(tmp_path, monkeypatch, capsys):
    """`curation maintain` = lake_maintenance_job in process on DAGSTER_HOME's instance: a dry run
    changes nothing, a run compacts and (retention 0) frees the replaced files; bad flags are one
    line with exit status 2."""
    import importlib
    import sys

    import assets
    from assets.cli import main

    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    original = sys.modules.pop("assets.definitions", None)
    importlib.import_module("assets.definitions")
    try:
        lake, _ = _laid_out(tmp_path / "data" / "lake", 2, 300, LayoutConfig(clusters_per_bucket=2, flush_rows=250, spill=False))
        files = sum(layout_files_per_bucket(lake).values())
        assert main(["maintain", "--dry-run", "--retention-hours", "0"]) == 0
        out = capsys.readouterr().out
        assert "(dry run: nothing changed)" in out and f"layout: would compact 3 buckets ({files} files now)" in out
        assert sum(layout_files_per_bucket(lake).values()) == files
        assert main(["maintain", "--retention-hours", "0"]) == 0
        out = capsys.readouterr().out
        assert f"layout: compacted 3 buckets ({files} -> 3 files)" in out and f"pool_by_cluster: {files}" in out
        runs = DagsterInstance.get().get_runs()
        assert [r.job_name for r in runs] == ["lake_maintenance_job"] * 2 and runs[0].tags["curation/source"] == "cli"
        assert main(["maintain", "--tables", "nope"]) == 2
        assert "--tables: got unknown tables ['nope']" in capsys.readouterr().err
        assert main(["maintain", "--compact-min-files", "1"]) == 2
    finally:
        if original is not None:
            sys.modules["assets.definitions"] = original
            assets.definitions = original


def _launch_maintenance(home: Path, dagster_home: Path, config: dict):
    """``lake_maintenance_job`` as the daemon launches it: ``dagster job execute`` in its own
    process group, the multiprocess executor, the shipped instance config."""
    import json
    import subprocess
    import sys

    import yaml

    cfg = home / "run.yaml"
    cfg.write_text(yaml.safe_dump({"ops": {"maintain_lake": {"config": config}}}))
    env = run_env(home, dagster_home)
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "assets.definitions", "-a", "defs",
           "-j", "lake_maintenance_job", "-c", str(cfg), "--tags", json.dumps({"curation/source": "test"})]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)



def test_sigkill_during_compaction_leaves_the_layout_intact_and_the_next_run_finishes(tmp_path):
    """A maintenance run SIGKILLed (its whole process group) while the compaction writes its new
    bucket files: no commit, so the table is the old one (same files, same rows) and the half-
    written files are orphans; the next run compacts, and its vacuum (retention 0) deletes the
    orphans with the replaced files: on disk exactly the files the log references."""
    import signal
    import subprocess
    import time

    template = tmp_path / "template"
    lake, _ = _laid_out(template / "lake", 6, 1500, LayoutConfig(clusters_per_bucket=1, flush_rows=300, spill=False))
    write_dedup_scores(lake, dedup_scores_by_bucket(lake, config=LayoutConfig(clusters_per_bucket=1), incremental=False))
    rows = lake.read(LAYOUT_TABLE, columns=["uid", "cluster_id", "cos_to_centroid"]).sort("uid")
    dagster_home = shipped_dagster_home(tmp_path / "dagster_home")
    for attempt in range(4):  # the kill must land between the first new file and the commit
        home = tmp_path / f"home{attempt}"
        shutil.copytree(template, home)
        db = Lake(str(home / "lake"))
        version, referenced = db.table(LAYOUT_TABLE).version(), set(db.table(LAYOUT_TABLE).file_uris())
        before = _data_files(db, LAYOUT_TABLE)
        proc = _launch_maintenance(home, dagster_home, {"retention_hours": 168})
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (_data_files(db, LAYOUT_TABLE) - before):
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before its compaction wrote a file: {proc.stderr.read()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if db.table(LAYOUT_TABLE).version() == version:
            break  # killed before the commit
    else:
        raise AssertionError("the compaction always committed before the SIGKILL landed (4 attempts)")
    orphans = _data_files(db, LAYOUT_TABLE) - before
    assert orphans and set(db.table(LAYOUT_TABLE).file_uris()) == referenced
    assert db.read(LAYOUT_TABLE, columns=["uid", "cluster_id", "cos_to_centroid"]).sort("uid").equals(rows)
    # the next run: the killed one is still STARTED (no daemon marked it), but its worker is gone,
    # so it counts as no writer: the run compacts, and retention 0 deletes the orphans and the
    # replaced files
    proc = _launch_maintenance(home, dagster_home, {"retention_hours": 0})
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert all(c == 1 for c in layout_files_per_bucket(db).values())
    on_disk = {os.path.join(db.uri(LAYOUT_TABLE), f) for f in _data_files(db, LAYOUT_TABLE)}
    assert on_disk == set(db.table(LAYOUT_TABLE).file_uris()) and not (orphans & _data_files(db, LAYOUT_TABLE))
    assert db.read(LAYOUT_TABLE, columns=["uid", "cluster_id", "cos_to_centroid"]).sort("uid").equals(rows)
    full = dedup_scores_by_bucket(db, config=LayoutConfig(clusters_per_bucket=1), incremental=False)
    stored = db.read("dedup_scores").sort("uid")
    assert full.frame["uid"].equals(stored["uid"])
    np.testing.assert_array_equal(full.max_sim, stored["max_sim_to_earlier"].to_numpy())


def test_the_daemon_queue_runs_one_layout_writer_at_a_time(tmp_path):
    """Two ``lake_maintenance_job`` runs (tag ``curation/layout``, like ``pool_curation_job``)
    queued at once and dequeued by ``dagster-daemon run`` with the shipped dagster.yaml: the
    queue admits two runs at a time, yet the layout writers run one after the other (the
    second starts after the first ended), and both succeed: the first compacts, the second
    finds one file per bucket."""
    import json
    import subprocess
    import sys

    from dagster import DagsterEventType, RunsFilter

    from assets.stages import LAYOUT_TAG
    from daemon_helpers import start_daemon, stop, wait_for

    home = tmp_path / "home"
    lake, _ = _laid_out(home / "lake", 3, 300, LayoutConfig(clusters_per_bucket=2, flush_rows=250, spill=False))
    assert any(c > 1 for c in layout_files_per_bucket(lake).values())
    dagster_home = shipped_dagster_home(tmp_path / "dagster_home")
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    env = run_env(home, dagster_home, CURATION_AUTOMATION="off")
    for i in range(2):  # submitted to the queue as the schedule would (same code location)
        launch = subprocess.run(
            [sys.executable, "-m", "dagster", "job", "launch", "-w", str(REPO / "workspace.yaml"),
             "-j", "lake_maintenance_job", "--tags", json.dumps({"curation/source": f"test-{i}"})],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert launch.returncode == 0, launch.stderr[-3000:]
    runs = instance.get_runs(RunsFilter(job_name="lake_maintenance_job"))
    assert len(runs) == 2 and all(r.status == DagsterRunStatus.QUEUED and r.tags[LAYOUT_TAG] == "write" for r in runs)
    assert instance.run_coordinator.get_run_queue_config().max_concurrent_runs == 2
    daemon = start_daemon(env)
    try:
        def both_done():
            recs = [instance.get_run_record_by_id(r.run_id) for r in runs]
            return recs if all(r.dagster_run.is_finished for r in recs) else None

        recs = wait_for("both maintenance runs to finish", both_done, 480, daemon)
    finally:
        stop(daemon)
    assert [r.dagster_run.status for r in recs] == [DagsterRunStatus.SUCCESS] * 2
    first, second = sorted(recs, key=lambda r: r.start_time)
    assert second.start_time >= first.end_time, "two layout writers ran at once"
    assert all(c == 1 for c in layout_files_per_bucket(lake).values())

    def compacted(rec) -> int:
        (obs,) = instance.all_logs(rec.dagster_run.run_id, of_type=DagsterEventType.ASSET_OBSERVATION)
        return obs.dagster_event.event_specific_data.asset_observation.metadata["buckets_compacted"].value

    assert compacted(first) == 3 and compacted(second) == 0  # the second saw the first's commit
