"""Evidence through the assets: seeds x compute-curve budgets in trained_checkpoints, the report's curves."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, materialize
from test_model_assets import CHECKS, EVAL_SET, _samples, write_eval_set, write_export

from assets.evaluate import curation_report, eval_reports
from assets.train import trained_checkpoints
from resources import ComputeResource, DatasetsResource, LakeResource

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checks_for(asset_key: str):
    return [c for c in CHECKS if any(k.asset_key.to_user_string() == asset_key for k in c.check_keys)]


def test_seeds_and_compute_curve_budgets_reach_the_report(tmp_path):
    resources = {
        "lake": LakeResource(root=str(tmp_path / "lake"), artifacts_root=str(tmp_path / "artifacts")),
        "datasets": DatasetsResource(landing=str(tmp_path / "landing"), eval_root=str(tmp_path / "eval")),
        "compute": ComputeResource(device="cpu", precision="fp32", batch_size=16, num_workers=0),
    }
    artifacts = tmp_path / "artifacts"
    uids = write_export(artifacts, "full", _samples(12))
    write_eval_set(tmp_path / "eval")
    lake = resources["lake"].lake()
    lake.write("subsets", pl.DataFrame({"recipe": ["full"] * 12, "uid": uids, "rank": list(range(12)), "score": [0.0] * 12}), partition="full")
    lake.write("embeddings", pl.DataFrame({"uid": uids, "shard": ["toy-00000"] * 12}), partition="toy-00000")  # pool of 12
    # platform loop (fast); curve budgets are whole batches: 0.5 x 12 -> 8, 2 x 12 -> 24
    cfg = {"samples_seen": 16, "batch_size": 8, "seeds": [0, 1], "samples_seen_multiples": [0.5, 2.0], "backend": "platform"}
    instance = DagsterInstance.ephemeral()
    res = materialize(
        [trained_checkpoints, eval_reports, *_checks_for("trained_checkpoints"), *_checks_for("eval_reports")],
        partition_key="full", resources=resources, instance=instance,
        run_config={"ops": {"trained_checkpoints": {"config": cfg}, "eval_reports": {"config": {"eval_sets": [EVAL_SET]}}}},
    )  # fmt: skip
    assert res.success
    evals = res.get_asset_check_evaluations()
    assert all(e.passed for e in evals), [(e.check_name, e.metadata) for e in evals]  # matched compute ignores curve runs
    cks = lake.read("checkpoints")
    # 2 seeds x (main 16 + curves 8 and 24 samples seen), typed columns
    assert cks.height == 6 and cks.schema["main_budget"] == pl.Boolean
    assert sorted(cks.select("seed", "samples_seen", "main_budget").iter_rows()) == [
        (0, 8, False), (0, 16, True), (0, 24, False), (1, 8, False), (1, 16, True), (1, 24, False)]  # fmt: skip
    assert all(t >= 1 for t in cks["torch_threads"].to_list())
    assert {Path(p).name for p in cks["path"].to_list()} >= {"tiny-rn-32-clip-seed0.pt", "tiny-rn-32-clip-seed1-seen24.pt"}

    res = materialize([curation_report], resources=resources, instance=instance)
    assert res.success
    reports = artifacts / "reports"
    assert (reports / "compute_curves.png").exists() and (reports / "metrics_vs_fraction.png").exists()
    curves = pl.read_parquet(reports / "compute_curves.parquet")
    assert sorted(curves["samples_seen"].to_list()) == [8, 16, 24] and set(curves["seeds"].to_list()) == {2}
    md = (reports / "curation_report.md").read_text()
    assert "## Verdict" in md and "Compute curves" in md and "| full | 12 | 1.00 | 1.00 | 2 | 16 |" in md
    with pytest.raises(Exception, match="samples_seen_multiples"):
        materialize([trained_checkpoints], partition_key="full", resources=resources, instance=instance,
                    run_config={"ops": {"trained_checkpoints": {"config": {**cfg, "samples_seen_multiples": [0.0]}}}})  # fmt: skip
