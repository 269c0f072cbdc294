"""Drive the Dagster UI in headless Chromium: the lineage is there and a partition run succeeds;
the images the platform decides about are shown (cluster gallery, a duplicate group, kept vs
removed) in the UI and in the HTML explorer, as decoded ``<img>`` elements of non-zero size.

Starts ``curation ui``'s server (``assets.ui.start_ui``) on a temporary instance and data
home holding a small build of the default dataset, checks every lineage asset is shown in the
asset catalog and in curation_report's upstream lineage graph, launches ``raw_shards`` for one shard from the asset page's
Materialize dialog, and waits (GraphQL) until that run succeeds. Screenshots go to
``test-artifacts/``. The server is stopped by its process group in a ``finally``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest

from browser_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    decoded_images,
    dismiss_popups,
    graphql,
    open_markdown_metadata,
    free_port,
    missing_from_graph,
    require_chromium,
    wait_for_partition_run,
)
from daemon_helpers import shipped_dagster_home

pytestmark = pytest.mark.browser

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"
HOST = "127.0.0.1"
LINEAGE = (
    "raw_shards",
    "samples",
    "embeddings",
    "concept_clusters",
    "dedup_scores",
    "complexity_scores",
    "filter_model",
    "pruned_subsets",
    "trained_checkpoints",
    "eval_reports",
    "curation_report",
)


@pytest.fixture
def ui_homes(small_dataset, tmp_path):
    """A fresh data home (landing + eval copied from the small dataset) and Dagster home
    (the shipped dagster.yaml) with the shard partitions registered."""
    from dagster import DagsterInstance

    from curation.ingest.shards import find_shards

    home = tmp_path / "curation_home"
    for sub in ("landing", "eval"):
        if (small_dataset / sub).exists():
            shutil.copytree(small_dataset / sub, home / sub)
    dagster_home = shipped_dagster_home(tmp_path / "dagster_home")
    keys = sorted(find_shards(home / "landing"))
    assert keys, f"no shards in {home / 'landing'}"
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("shards", keys)
    return home, dagster_home, keys


def test_ui_shows_lineage_and_runs_a_partition(ui_homes, tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    from assets.ui import start_ui, stop_ui

    home, dagster_home, keys = ui_homes
    shard = keys[0]
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port(HOST)
    base = f"http://{HOST}:{port}"
    t0 = time.perf_counter()
    proc = start_ui(
        host=HOST,
        port=port,
        dagster_home=dagster_home,
        env={"CURATION_HOME": str(home), "CURATION_AUTOMATION": "off"},
        log_file=tmp_path / "ui.log",
    )
    t_up = time.perf_counter() - t0
    page = None
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                user_data_dir=str(tmp_path / "chromium-profile"),  # empty profile
                executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1600, "height": 1000},
            )
            try:
                page = ctx.new_page()
                page.set_default_timeout(60_000)

                # 1. Every lineage asset is in the catalog and in the upstream lineage graph of
                #    curation_report (asset groups are expanded there, unlike the global view).
                page.goto(f"{base}/assets")
                dismiss_popups(page, wait_ms=8000)
                for name in LINEAGE:  # the table loads after the page: the first wait is the long one
                    expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
                page.screenshot(path=str(ARTIFACTS / "ui_catalog.png"), full_page=True)
                page.goto(f"{base}/assets/curation_report?view=lineage&lineageScope=upstream&lineageDepth=20")
                dismiss_popups(page, wait_ms=1000)
                expect(page.get_by_text("Graph depth")).to_be_visible(timeout=30_000)
                # the graph zooms to fit after its layout; node labels may be middle-truncated
                deadline = time.monotonic() + 30
                while (missing := missing_from_graph(page, LINEAGE)) and time.monotonic() < deadline:
                    page.wait_for_timeout(500)
                assert not missing, f"assets missing from curation_report's upstream lineage graph: {missing}"
                page.wait_for_timeout(1500)  # edges are drawn after the nodes
                page.screenshot(path=str(ARTIFACTS / "ui_lineage.png"))

                # 2. Launch raw_shards for one shard from the asset's Materialize dialog.
                page.goto(f"{base}/assets/raw_shards")
                dismiss_popups(page, wait_ms=1500)
                page.get_by_role("button", name="Materialize…").click()
                dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
                expect(dialog).to_be_visible()
                dialog.get_by_text("Select a partition or create one").click()
                page.get_by_role("menuitem").filter(has_text=shard).first.click()
                dialog.get_by_text("Launch runs to materialize").click()  # close the picker
                page.screenshot(path=str(ARTIFACTS / "ui_launch_dialog.png"))
                dialog.get_by_role("button", name="Launch 1 run").click()

                # 3. The run succeeds (polled through the webserver's GraphQL API).
                t1 = time.perf_counter()
                run = wait_for_partition_run(base, shard, timeout=150)
                t_run = time.perf_counter() - t1
                page.goto(f"{base}/runs/{run['runId']}")
                expect(page.get_by_text("Success").first).to_be_visible()
                expect(page.get_by_text("Loading run logs")).to_have_count(0, timeout=30_000)
                page.screenshot(path=str(ARTIFACTS / "ui_run.png"))
                assert run["status"] == "SUCCESS", f"run {run['runId']} ended {run['status']}; see {tmp_path / 'ui.log'}"
                tags = {t["key"]: t["value"] for t in run["tags"]}
                assert tags.get("dagster/partition") == shard
                log.info("UI up in %.1f s; run %s succeeded in %.1f s", t_up, run["runId"], t_run)
            except BaseException:
                if page is not None:
                    page.screenshot(path=str(ARTIFACTS / "ui_failure.png"))
                raise
            finally:
                ctx.close()
    finally:
        stop_ui(proc)

    # The materialization reached the instance the UI ran on.
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert shard in instance.get_materialized_partitions(AssetKey("raw_shards"))


# --------------------------------------------------------------------------- the images


@pytest.fixture
def curated_homes(small_dataset, tmp_path, monkeypatch):
    """The small emoji dataset taken through the CLI as a user would: shards registered and
    ingested + embedded (shard_ingest_job), pool curation without the filter model
    (pool_curation_job), one recipe's subset (recipe_job) and the explorer."""
    import assets.definitions as definitions
    from assets.cli import main

    home = tmp_path / "curation_home"
    for sub in ("landing", "eval"):
        if (small_dataset / sub).exists():
            shutil.copytree(small_dataset / sub, home / sub)
    dagster_home = shipped_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("CURATION_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("CURATION_AUTOMATION", "off")
    monkeypatch.setattr(definitions, "_DEFS", None)  # resources built under these homes
    from curation.ingest.shards import find_shards

    keys = sorted(find_shards(home / "landing"))
    assert main(["shards", "register"]) == 0
    for key in keys:
        assert main(["materialize", "raw_shards", "samples", "embeddings", "--partition", key]) == 0
    assert main(["materialize", "concept_clusters", "dedup_scores", "complexity_scores"]) == 0
    assert main(["materialize", "pruned_subsets", "--partition", "dbp@0.5"]) == 0
    assert main(["explore"]) == 0
    yield home, dagster_home
    definitions._DEFS = None


def test_ui_and_explorer_show_the_images(curated_homes, tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    from assets.ui import start_ui, stop_ui

    home, dagster_home = curated_homes
    explorer = home / "artifacts" / "reports" / "explorer.html"
    assert explorer.exists()
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port(HOST)
    base = f"http://{HOST}:{port}"
    proc = start_ui(host=HOST, port=port, dagster_home=dagster_home,
                    env={"CURATION_HOME": str(home), "CURATION_AUTOMATION": "off"}, log_file=tmp_path / "ui.log")
    page = None
    try:
        # The CLI's runs are the named jobs, tagged as coming from the CLI.
        runs = graphql(base, RUNS_BY_TAG, {"filter": {"tags": [{"key": "curation/source", "value": "cli"}]}})
        jobs = {r["jobName"] for r in runs["runsOrError"]["results"]}
        assert jobs == {"shard_ingest_job", "pool_curation_job", "recipe_job"}, jobs
        ingest_run = next(r for r in runs["runsOrError"]["results"] if r["jobName"] == "shard_ingest_job")
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                user_data_dir=str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS, headless=True, viewport={"width": 1600, "height": 1100},
            )
            try:
                page = ctx.new_page()
                page.set_default_timeout(60_000)
                views = (
                    ("complexity_scores", "cluster_gallery", 12, "ui_cluster_gallery.png"),
                    ("dedup_scores", "duplicate_groups", 2, "ui_duplicate_group.png"),
                    ("dedup_scores", "removed_fraction_plot", 1, "ui_removed_fraction_plot.png"),
                    ("pruned_subsets", "kept_vs_removed", 6, "ui_kept_vs_removed.png"),
                )
                first = True
                for asset, key, minimum, shot in views:
                    page.goto(f"{base}/assets/{asset}")
                    if first:
                        dismiss_popups(page, wait_ms=8000)
                        first = False
                    expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=60_000)
                    dialog = open_markdown_metadata(page, key)
                    imgs = decoded_images(dialog, minimum=minimum)
                    assert all(i["data"] for i in imgs), f"{asset}/{key}: images not embedded as data URIs"
                    dialog.evaluate("d => d.scrollIntoView({block: 'start'})")  # screenshot from its top
                    page.wait_for_timeout(300)
                    page.screenshot(path=str(ARTIFACTS / shot))
                    page.keyboard.press("Escape")
                    expect(dialog).to_have_count(0)

                # progress of the embedding is on the run page (log lines + observations)
                page.goto(f"{base}/runs/{ingest_run['runId']}")
                expect(page.get_by_text("Loading run logs")).to_have_count(0, timeout=30_000)
                expect(page.get_by_text("embed step", exact=False).first).to_be_attached(timeout=30_000)
                box = page.get_by_placeholder("Filter…")
                box.fill("step:embeddings")
                box.press("Enter")
                page.keyboard.press("Escape")
                eta = page.get_by_text("eta_s", exact=True).first  # the progress observation
                eta.scroll_into_view_if_needed()
                expect(eta).to_be_visible()
                expect(page.get_by_text("samples_per_s", exact=True).first).to_be_visible()
                page.wait_for_timeout(500)
                page.screenshot(path=str(ARTIFACTS / "ui_run_progress.png"))

                # the explorer: same views, standalone
                page.goto(explorer.as_uri())
                for section, minimum, shot in (
                    ("#clusters ~ .cluster", 12, "explorer_clusters.png"),
                    ("#semdedup ~ .group", 2, "explorer_duplicate_group.png"),
                    ("#recipes ~ .recipe", 6, "explorer_kept_removed.png"),
                ):
                    block = page.locator(section).first
                    block.scroll_into_view_if_needed()
                    decoded_images(block, minimum=minimum)
                    block.screenshot(path=str(ARTIFACTS / shot))
                page.locator("#semdedup ~ .group figure").first.click()
                expect(page.locator("#explain")).to_contain_text("SemDeDup M")
                expect(page.locator("#explain")).to_contain_text("dbp@0.5")
                page.screenshot(path=str(ARTIFACTS / "explorer_explain.png"))
            except BaseException:
                if page is not None:
                    page.screenshot(path=str(ARTIFACTS / "ui_images_failure.png"))
                raise
            finally:
                ctx.close()
    finally:
        stop_ui(proc)


RUNS_BY_TAG = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter, limit: 50) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
  }
}
"""
