"""The one Definitions object holds every asset, check, job, sensor, schedule and resource."""

import pytest
from dagster import AssetKey

from assets.definitions import defs

LINEAGE = {
    "raw_shards": set(),
    "samples": {"raw_shards"},
    "embeddings": {"samples"},
    "concept_clusters": {"embeddings"},
    "dedup_scores": {"concept_clusters"},
    "complexity_scores": {"concept_clusters"},
    "filter_model": {"samples", "embeddings"},
    "pruned_subsets": {"samples", "concept_clusters", "complexity_scores", "dedup_scores", "filter_model"},
    "trained_checkpoints": {"pruned_subsets"},
    "eval_reports": {"trained_checkpoints"},
    "curation_report": {"eval_reports"},
}

CHECKS = {
    ("samples", "every_key_accounted_for"),
    ("samples", "uids_unique"),
    ("samples", "captions_within_policy"),
    ("embeddings", "embeddings_finite"),
    ("embeddings", "embeddings_unit_norm"),
    ("embeddings", "embeddings_one_row_per_sample"),
    ("concept_clusters", "cluster_tables_no_nan"),
    ("pruned_subsets", "budgets_sum_to_n_keep"),
    ("pruned_subsets", "kept_uids_in_samples"),
    ("pruned_subsets", "no_heldout_samples"),
    ("trained_checkpoints", "checkpoints_load_with_finite_weights"),
    ("trained_checkpoints", "samples_seen_matched"),
    ("eval_reports", "eval_metrics_in_unit_interval"),
    ("filter_model", "filter_embeddings_valid"),
    ("curation_report", "report_covers_evaluated_recipes"),
}


def test_every_lineage_asset_with_its_upstreams():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(LINEAGE)
    for asset, parents in LINEAGE.items():
        got = {k.to_user_string() for k in graph.get(AssetKey(asset)).parent_keys}
        assert parents <= got, (asset, got)


def test_partitioning_follows_the_design():
    graph = defs.resolve_asset_graph()
    shard_assets = {"raw_shards", "samples", "embeddings"}
    recipe_assets = {"pruned_subsets", "trained_checkpoints", "eval_reports"}
    for name in LINEAGE:
        pd = graph.get(AssetKey(name)).partitions_def
        if name in shard_assets:
            assert pd is not None and pd.name == "shards"
        elif name in recipe_assets:
            assert pd is not None and "dbp@0.5" in pd.get_partition_keys()
        else:
            assert pd is None, name


def test_every_expected_check_job_sensor_schedule_and_resource():
    checks = {(k.asset_key.to_user_string(), k.name) for cd in defs.asset_checks for k in cd.check_keys}
    assert CHECKS <= checks
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"shard_ingest_job", "pool_curation_job", "recipe_job", "report_job", "lake_maintenance_job"} <= jobs
    assert {s.name for s in defs.sensors} == {
        "landing_sensor", "curate_after_ingest", "recipes_after_pool_curation", "report_after_recipes"
    }
    assert {s.name for s in defs.schedules} == {"recurate_schedule", "maintenance_schedule"}
    assert set(defs.resources) == {"lake", "datasets", "compute", "encoder", "distributed"}


@pytest.mark.parametrize("module", ["curation.ingest.shards", "curation.select.recipes", "curation.train.trainer", "curation.select.clustering"])
def test_library_never_imports_dagster(module):
    import subprocess
    import sys

    code = f"import sys, {module}; bad = [m for m in sys.modules if m.split('.')[0] in ('dagster', 'assets', 'resources')]; print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_pool_wide_library_never_imports_torch():
    """The pool-wide half (layout, SemDeDup, recipes, exports, pool reads) runs without torch:
    importing it in a fresh process leaves torch unimported (torch costs ~0.7 GiB of RSS and
    ~1.6 s in every pool step's process, and the benchmark's memory numbers carry it)."""
    import subprocess
    import sys

    mods = ["curation.select.layout", "curation.select.recipes", "curation.select.pool_tables", "curation.select.export",
            "curation.select.clustering", "curation.select.clipcov", "curation.embed.pool_reader", "assets.definitions"]
    code = f"import sys; import {', '.join(mods)}; print([m for m in sys.modules if m.split('.')[0] == 'torch'][:3])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_public_face_of_the_library_resolves():
    import curation

    for name in curation.__all__:
        assert callable(getattr(curation, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        curation.nope  # noqa: B018


def test_importing_the_definitions_reads_no_environment_and_no_recipe_file():
    """In a fresh process: importing assets.definitions leaves every CURATION_* variable and the
    recipe file unread (a bogus value would raise if read); building them reads both."""
    import subprocess
    import sys

    code = (
        "import os; os.environ['CURATION_AUTOMATION'] = 'bogus'; os.environ['CURATION_RECIPES'] = '/nonexistent.yaml'\n"
        "import assets.definitions as d\n"
        "try:\n    d.get_defs()\nexcept Exception as e:\n    print('build reads env:', type(e).__name__); raise SystemExit(0)\n"
        "raise SystemExit('building the definitions did not read the environment')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "build reads env" in out.stdout
