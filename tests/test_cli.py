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


# --------------------------------------------------------------------------- errors, jobs, config


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["materialize", "nope"], "unknown asset nope; expected some of raw_shards, samples"),
        (["materialize", "pruned_subsets"], "pruned_subsets is partitioned by recipe: pass --partition with one of: full, full+slip, random@0.5"),
        (["materialize", "trained_checkpoints", "--partition", "x@1"], "--partition: got 'x@1'; expected a recipe key: full"),
        (["materialize", "concept_clusters", "--partition", "full"], "concept_clusters is not partitioned; drop --partition"),
        (["materialize", "samples", "pruned_subsets", "--partition", "full"], "materialize them in separate commands"),
        (["backfill", "--recipes", "nope"], "unknown recipes ['nope']; expected any of"),
        (["materialize", "concept_clusters", "--config", "/does/not/exist.yaml"], "--config: got '/does/not/exist.yaml', which does not exist"),
    ],
)
def test_usage_errors_are_one_line_with_the_valid_choices(homes, capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_shard_asset_without_partition_lists_the_landed_shards(homes, capsys):
    (homes / "data" / "landing" / "mine").mkdir(parents=True)
    for stem in ("00000", "00001"):
        (homes / "data" / "landing" / "mine" / f"{stem}.tar").write_bytes(b"")
    assert main(["materialize", "samples"]) == 2
    assert "samples is partitioned by shard: pass --partition with one of: mine-00000, mine-00001" in capsys.readouterr().err


def test_config_file_errors_name_the_bad_key(homes, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  concept_clusterz:\n    config: {k: 3}\n")
    assert main(["materialize", "concept_clusters", "--config", str(bad)]) == 2
    assert "unknown asset 'concept_clusterz' under ops; expected some of raw_shards" in capsys.readouterr().err
    bad.write_text("ops:\n  concept_clusters:\n    config: {kk: 3}\n")
    assert main(["materialize", "concept_clusters", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert 'invalid run config for pool_curation_job' in err and '"kk"' in err and "niter" in err and "Traceback" not in err


def test_materialize_registers_the_shard_and_runs_the_named_job(homes, small_dataset, capsys):
    import shutil

    from dagster import DagsterInstance, RunsFilter

    shutil.copytree(small_dataset / "landing", homes / "data" / "landing")
    key = sorted(p.stem for p in (homes / "data" / "landing" / "emoji").glob("*.tar"))[0]
    assert main(["materialize", "raw_shards", "samples", "--partition", f"emoji-{key}"]) == 0
    out = capsys.readouterr().out
    assert f"registered shard partition emoji-{key}" in out and "shard_ingest_job run" in out
    instance = DagsterInstance.get()
    (run,) = instance.get_runs(RunsFilter(tags={"curation/source": "cli"}))
    assert run.job_name == "shard_ingest_job" and run.tags["dagster/partition"] == f"emoji-{key}"
    assert Lake(str(homes / "data" / "lake")).read("samples").height > 0


def test_help_is_fast_quiet_and_lists_the_environment():
    """--help and a usage error import no Dagster, torch or polars (startup stays fast)."""
    import subprocess
    import sys

    code = (
        "import sys; from assets.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "rc = main(['materialize', 'nope'])\n"
        "heavy = sorted(m for m in ('dagster', 'torch', 'polars', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert "HEAVY [] 2" in r.stdout, r.stdout + r.stderr
    for var in ("CURATION_HOME", "DAGSTER_HOME", "CURATION_RECIPES"):
        assert var in r.stdout
    assert "PreviewWarning" not in r.stderr and "alembic" not in r.stderr
