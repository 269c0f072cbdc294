"""Every benchmark runs end to end on tiny inputs (their numbers are not asserted, only that they
run and that their own correctness checks hold). Nothing ran them before: `prune_scale.py --mode
memory` had been failing since its subprocess lost the mode flag, `train_backends.py` failed on a
held-out split of fewer than 10 images, `reproducibility.py` without a dataset died on an
IndexError, and `train_memory.py --phases evaluate` alone on a missing checkpoint's model name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``benchmarks/<name> args`` in its own process, on the data home ``home``, from ``cwd``."""
    env = dict(os.environ, CURATION_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _run(tmp_path: Path, *args: str) -> tuple[list[dict], str]:
    """``prune_scale.py`` with ``args``: its ``--json`` results and what it printed."""
    out = tmp_path / "r.json"
    proc = _script("prune_scale.py", *args, "--json", str(out), home=tmp_path / "unused", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_memory_mode_runs_with_either_uid_scheme(tmp_path):
    hashed, text = _run(tmp_path, "--mode", "memory", "--n", "6000", "--k", "12", "--skip-clipcov")
    (r,) = hashed
    assert r["uids"] == "hashed" and r["n"] == 6000 and "hashed uids" in text and "targets at N=6,000" in text
    assert r["semdedup_recall"] == 1.0 and r["dbp_kept"] > 0  # every planted near-copy found
    (c,) = _run(tmp_path, "--mode", "memory", "--n", "6000", "--k", "12", "--skip-clipcov", "--uids", "counter")[0]
    assert c["uids"] == "counter" and c["flagged"] == r["flagged"]  # same vectors: the same near-copies


def test_lake_mode_matches_the_in_memory_path_and_updates(tmp_path):
    runs, text = _run(tmp_path, "--n", "12000", "--k", "12", "--shard-rows", "2000", "--repeat", "2")
    assert [r["repeat"] for r in runs] == [0, 1]
    for r in runs:
        assert r["parity_with_in_memory"] == {"rows_compared": 12000, "dedup_scores_identical": True,
                                              "budgets_identical": True, "kept_uids_identical": True}
        assert r["incr_new_rows"] == 2000 and r["incremental"]["mode"] == "incremental"
        assert r["incremental_local"]["new_rows"] == 2000
        # the bound is the best of four sgemm readings (start, around SemDeDup, end)
        assert len(r["sgemm_gflops_readings"]) == 4 and r["sgemm_gflops"] == max(r["sgemm_gflops_readings"])
        assert r["ratio_to_sgemm"]["semdedup"] > 0
    from curation.select.faiss_loader import cpu_flags, openblas_coretype

    want = openblas_coretype(cpu_flags())
    if want is not None and runs[0]["faiss_blas"] is not None:
        assert runs[0]["faiss_blas"].lower() == want.lower()  # not a generic core
    assert "faiss's OpenBLAS kernels: " in text
    from curation.select import native_blas

    assert runs[0]["semdedup_gram"] == native_blas.status()  # what the run's process ran
    assert runs[0]["semdedup_gram_native"] == native_blas.available()
    if native_blas.available():
        assert f"SemDeDup's Gram: ssyrk of {runs[0]['semdedup_gram']}" in text
    # repeats: the same seeded pool each time, so the same kept uids; medians and ranges printed
    assert runs[0]["kept_uids_hash"] == runs[1]["kept_uids_hash"]
    assert "medians of 2 runs (min - max)" in text and "kept uids identical in every run: True" in text
    targets = next(line for line in text.splitlines() if line.startswith("targets at N=12,000 (medians of 2 runs)"))
    assert targets.count("; met in ") == 4 and "SemDeDup x sgemm" in targets


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory) -> Path:
    from curation.ingest.emoji_dataset import build_default_dataset

    home = tmp_path_factory.mktemp("bench_home")
    build_default_dataset(home, limit=12, samples_per_shard=100, seed=0, workers=1)
    return home


def test_reproducibility_two_processes_train_identical_weights(tiny_home, tmp_path):
    proc = _script("reproducibility.py", "--runs", "2", "--n", "32", "--samples-seen", "64", home=tiny_home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line.split(": ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("run ")]
    assert len(runs) == 2 and runs[0]["weights_sha256"] == runs[1]["weights_sha256"]
    assert runs[0]["embeddings_sha256"] == runs[1]["embeddings_sha256"] and runs[0]["steps"] > 0
    empty = _script("reproducibility.py", "--runs", "1", home=tmp_path / "nothing", cwd=tmp_path)
    assert empty.returncode == 2 and "got no shards in" in empty.stderr and "curation datasets build default" in empty.stderr


def test_train_backends_trains_and_evaluates_both_backends(tiny_home, tmp_path):
    proc = _script("train_backends.py", "--home", str(tiny_home), "--seeds", "0", "--samples-seen", "64",
                   "--batch-size", "32", home=tiny_home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["backend"] for r in rows) == ["open_clip_train", "platform"]
    assert all(0 <= r["retrieval_mean_recall@1"] <= 1 and r["samples_seen"] >= 64 for r in rows)
    assert "| open_clip_train |" in proc.stdout and "| platform |" in proc.stdout


def test_embed_throughput_measures_both_paths(tmp_path):
    proc = _script("embed_throughput.py", "--limit", "12", "--samples-per-shard", "200", "--rounds", "1", "--sizes", "",
                   "--pool-rows", "0", "--json", str(tmp_path / "e.json"), home=tmp_path / "unused", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["samples"] > 0 and r["bare_samples_per_s"] > 0 and r["e2e_samples_per_s"] > 0 and len(r["rounds"]["e2e"]) == 1


def test_train_memory_runs_its_phases_and_names_a_missing_checkpoint(tmp_path):
    tiny = ["--n", "256", "--pool-n", "128", "--eval-n", "64", "--samples-seen", "128", "--work", str(tmp_path / "w")]
    alone = _script("train_memory.py", *tiny, "--phases", "evaluate", home=tmp_path / "unused", cwd=tmp_path)
    assert alone.returncode == 2 and "evaluate phase evaluates the train-platform phase's checkpoint" in alone.stderr
    proc = _script("train_memory.py", *tiny, home=tmp_path / "unused", cwd=tmp_path)  # every phase
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["phase"] for r in rows] == ["train-platform", "train-open_clip_train", "filter_model", "evaluate"]
    assert rows[-1]["eval_n"] == 64
    assert "ALL PHASES" in proc.stdout
