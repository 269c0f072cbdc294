"""The README's main command, `curation demo`, end to end on a small dataset through the CLI."""

import os
from pathlib import Path

import pytest

from assets.cli import main
from curation.storage.lake import Lake


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Temp CURATION_HOME / DAGSTER_HOME, with assets.definitions re-imported under them (its
    resources read CURATION_HOME at import) and the original module restored afterwards."""
    import importlib
    import sys

    import assets

    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    original = sys.modules.pop("assets.definitions", None)
    importlib.import_module("assets.definitions")
    yield tmp_path
    if original is not None:
        sys.modules["assets.definitions"] = original
        assets.definitions = original


@pytest.mark.e2e
def test_demo_runs_the_whole_lineage_and_prints_the_report(homes, capsys, one_torch_thread):
    rc = main(["demo", "--limit", "40", "--samples-seen", "256", "--recipes", "full", "dbp@0.5",
               "--seeds", "0", "--samples-seen-multiples", "--no-audit"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = homes / "data" / "artifacts" / "reports" / "curation_report.html"
    assert f"Report:       {report}" in out
    assert report.exists() and "dbp@0.5" in report.read_text()
    lake = Lake(str(homes / "data" / "lake"))
    n_samples = lake.read("samples").height
    assert n_samples > 0 and lake.read("embeddings").height == n_samples
    assert set(lake.read("eval_results")["recipe"].unique()) == {"full", "dbp@0.5"}
    ckpt = lake.read("checkpoints")
    assert set(ckpt["samples_seen"].to_list()) == {256}
    # the runs are on the persistent instance the UI shows
    assert any(Path(os.environ["DAGSTER_HOME"]).glob("**/*.db"))


def test_demo_rejects_unknown_recipes_listing_the_valid_ones(homes, capsys):
    rc = main(["demo", "--recipes", "nope@1"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown recipes ['nope@1']" in err and "dbp@0.5" in err
