"""Jobs over the lineage, one per stage (partitioned and unpartitioned assets cannot share one).

* ``shard_ingest_job``   raw_shards, samples, embeddings for one shard partition (the landing
  sensor launches one run per new shard).
* ``pool_curation_job``  concept_clusters, dedup_scores, complexity_scores, filter_model
  (unpartitioned; its run config sets ``concept_clusters``' mode: ``auto`` assigns new
  shards to the existing centroids, ``retrain`` re-clusters).
* ``recipe_job``         pruned_subsets, trained_checkpoints, eval_reports, partitioned by
  recipe: one run per recipe, and the job a UI backfill over recipes launches.
* ``report_job``         curation_report (all recipes side by side).

Also the ``RunRequest`` builders the sensors and the schedule share (deterministic run keys).
"""

from __future__ import annotations

from collections.abc import Iterable

from dagster import AssetSelection, RunRequest, define_asset_job

from assets.partitions import recipe_partitions, shard_partitions
from assets.stages import (
    LAYOUT_TAG,
    MODE_TAG,
    POOL_ASSETS,
    RECIPE_ASSETS,
    REPORT_ASSETS,
    SHARD_ASSETS,
    STAGE_TAG,
    TRIGGER_TAG,
    WAVE_TAG,
    pool_run_config,
)

# One run per new shard: the raw file, its samples (+ quarantine), its embeddings.
shard_ingest_job = define_asset_job(
    "shard_ingest_job",
    selection=AssetSelection.assets(*SHARD_ASSETS),
    partitions_def=shard_partitions,
    tags={STAGE_TAG: "shard"},
    description="Ingest one landed shard: raw_shards -> samples (+ quarantine) -> embeddings.",
)

pool_curation_job = define_asset_job(
    "pool_curation_job",
    selection=AssetSelection.assets(*POOL_ASSETS),
    tags={STAGE_TAG: "pool", LAYOUT_TAG: "write"},
    description="Pool-wide curation: cluster (auto-assign or retrain), dedup and complexity scores, filter model.",
)


recipe_job = define_asset_job(
    "recipe_job",
    selection=AssetSelection.assets(*RECIPE_ASSETS),
    partitions_def=recipe_partitions,
    tags={STAGE_TAG: "recipe"},
    description="Per recipe: prune the pool, train a CLIP on the subset, evaluate it. Backfill it over recipes.",
)


report_job = define_asset_job(
    "report_job",
    selection=AssetSelection.assets(*REPORT_ASSETS),
    tags={STAGE_TAG: "report"},
    description="The side-by-side curation report over all recipes.",
)

CURATION_JOBS = [pool_curation_job, recipe_job, report_job]  # what the automation chains after ingest
JOBS = [shard_ingest_job, *CURATION_JOBS]


def _valid_recipes(recipes: Iterable[str] | None) -> list[str]:
    known = recipe_partitions.get_partition_keys()
    if recipes is None:
        return list(known)
    recipes = list(recipes)
    unknown = [r for r in recipes if r not in known]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; expected some of {known}")
    return recipes


def pool_run_request(run_key: str, mode: str, trigger: str) -> RunRequest:
    """A ``pool_curation_job`` run that starts wave ``run_key``."""
    return RunRequest(
        run_key=run_key,
        job_name=pool_curation_job.name,
        run_config=pool_run_config(mode),
        tags={WAVE_TAG: run_key, TRIGGER_TAG: trigger, MODE_TAG: mode},
    )


def recipe_run_requests(wave: str, recipes: Iterable[str] | None = None, trigger: str = "") -> list[RunRequest]:
    """One ``recipe_job`` run per recipe partition of ``wave`` (run_key ``<wave>:<recipe>``)."""
    tags = {WAVE_TAG: wave}
    if trigger:
        tags[TRIGGER_TAG] = trigger
    return [
        RunRequest(run_key=f"{wave}:{r}", job_name=recipe_job.name, partition_key=r, tags=dict(tags))
        for r in _valid_recipes(recipes)
    ]
