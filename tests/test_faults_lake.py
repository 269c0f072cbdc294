"""Fault injection: the lake under concurrent first writes and killed writes (issue 12, cases 1 and 9).

Two ingest runs of a freshly dropped dataset write the first partitions of ``samples`` at the
same moment. Both must keep their rows. The writers are separate PROCESSES (as the run
coordinator's two concurrent runs are), synchronized by a barrier before every trial, and the
trial is repeated so a race that loses rows in a fraction of trials is caught.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import polars as pl

from curation.storage.lake import Lake

TRIALS = 12
WRITERS = 3


def _writer(root: str, name: str, trials: int, barrier, errors) -> None:
    rows = 5
    for t in range(trials):
        df = pl.DataFrame(
            {"uid": [f"{name}-{i}" for i in range(rows)], "shard": [name] * rows, "caption": ["c"] * rows}
        )
        lake = Lake(os.path.join(root, f"trial{t:03d}"))
        barrier.wait(timeout=60)
        try:
            lake.write("samples", df, partition=name)
        except Exception as e:  # a failed run is visible (not silent loss), but still a failure here
            errors.put(f"trial {t} {name}: {type(e).__name__}: {e}")


def test_concurrent_first_writes_from_processes_keep_every_partition(tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["curation.storage.lake"])
    barrier = ctx.Barrier(WRITERS)
    errors = ctx.Queue()
    names = [f"ds-{i:05d}" for i in range(WRITERS)]
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), n, TRIALS, barrier, errors)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errs = []
    while not errors.empty():
        errs.append(errors.get())
    assert not errs, f"{len(errs)} writes failed: {errs[:3]}"
    assert [p.exitcode for p in procs] == [0] * WRITERS, "a writer died (see its stderr)"
    lost = []
    for t in range(TRIALS):
        df = Lake(str(tmp_path / f"trial{t:03d}")).read("samples")
        per = df.group_by("shard").len()
        got = dict(zip(per["shard"].to_list(), per["len"].to_list()))
        if got != {n: 5 for n in names}:
            lost.append((t, got))
    assert not lost, f"{len(lost)} of {TRIALS} trials lost rows: {lost[:3]}"


def test_table_is_created_once_with_its_schema_and_rewrites_are_idempotent(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    df = pl.DataFrame({"uid": ["a"], "shard": ["s1"], "caption": ["x"]})
    lake.write("samples", df, partition="s1")
    lake.write("samples", df.with_columns(shard=pl.lit("s2")), partition="s2")
    lake.write("samples", df, partition="s1")
    out = lake.read("samples").sort("shard")
    assert out["shard"].to_list() == ["s1", "s2"]
    # an empty first write still creates the table with the schema of the data
    lake.write("quarantine", pl.DataFrame(schema={"shard": pl.String, "key": pl.String}), partition="s1")
    assert lake.read("quarantine").columns == ["shard", "key"]


def test_exists_agrees_with_opening_the_table(tmp_path):
    """The local ``exists`` looks at the log instead of opening the table: a table whose log
    holds only a killed first commit's temporary file, or no log at all, does not exist."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    lake = Lake(str(tmp_path / "lake"))

    def opens(table: str) -> bool:
        try:
            DeltaTable(lake.uri(table))
            return True
        except TableNotFoundError:
            return False

    assert not lake.exists("samples") and not opens("samples")
    log = tmp_path / "lake" / "samples" / "_delta_log"
    log.mkdir(parents=True)
    assert not lake.exists("samples") and not opens("samples")  # an empty log
    (log / "_commit_0a1b.json.tmp").write_text("{}")  # a first commit killed before its rename
    assert not lake.exists("samples") and not opens("samples")
    lake.write("samples", pl.DataFrame({"uid": ["a"], "shard": ["s1"], "caption": ["x"]}), partition="s1")
    assert lake.exists("samples") and opens("samples")
    assert lake.exists("samples") == Lake("file://" + str(tmp_path / "lake")).exists("samples")


def test_vacuum_removes_files_orphaned_by_a_killed_write(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write("samples", pl.DataFrame({"uid": ["a"], "shard": ["s1"]}), partition="s1")
    # what a SIGKILLed writer leaves: a data file the log never references
    orphan = tmp_path / "lake" / "samples" / "shard=s1" / "part-00000-killed.parquet"
    orphan.write_bytes(b"PAR1 half written")
    old = time.time() - 8 * 24 * 3600
    os.utime(orphan, (old, old))
    fresh = tmp_path / "lake" / "samples" / "shard=s1" / "part-00001-inflight.parquet"
    fresh.write_bytes(b"PAR1 a concurrent writer's file")
    removed = lake.vacuum("samples")
    assert any("killed" in r for r in removed)
    assert not orphan.exists()
    assert fresh.exists(), "files younger than the retention may belong to a write in flight"
    assert lake.read("samples")["uid"].to_list() == ["a"]
