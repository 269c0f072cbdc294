"""The pruning benchmark runs end to end in both modes on a tiny pool (its numbers are not
asserted, only that it runs and that its correctness checks hold): `--mode memory` had been
failing since its subprocess lost the mode flag, and nothing ran it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "prune_scale.py"


def _run(tmp_path: Path, *args: str) -> tuple[list[dict], str]:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
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
    (r,), text = _run(tmp_path, "--n", "12000", "--k", "12", "--shard-rows", "2000")
    assert r["parity_with_in_memory"] == {"rows_compared": 12000, "dedup_scores_identical": True,
                                          "budgets_identical": True, "kept_uids_identical": True}
    assert r["incr_new_rows"] == 2000 and r["incremental"]["mode"] == "incremental"
    assert r["incremental_local"]["new_rows"] == 2000 and "targets at N=12,000" in text
