"""The lineage's stages, defined once: asset keys per stage, the run tags of the automation.

Jobs (:mod:`assets.jobs`), sensors (:mod:`assets.sensors`), the schedule
(:mod:`assets.schedules`), the backfill helper (:mod:`assets.backfill`) and the CLI all read
these lists, so a stage is changed in one place. Strings, not asset definitions: importing
this module builds nothing.
"""

# Asset keys by stage, in lineage order.
SHARD_ASSETS = ("raw_shards", "samples", "embeddings")  # per shard partition
POOL_ASSETS = ("concept_clusters", "dedup_scores", "complexity_scores", "filter_model")  # pool-wide
RECIPE_ASSETS = ("pruned_subsets", "trained_checkpoints", "eval_reports")  # per recipe partition
REPORT_ASSETS = ("curation_report",)  # all recipes side by side
STAGES = {"shard": SHARD_ASSETS, "pool": POOL_ASSETS, "recipe": RECIPE_ASSETS, "report": REPORT_ASSETS}

# Run tags.
WAVE_TAG = "curation/wave"  # ties the runs of one curation pass together
TRIGGER_TAG = "curation/trigger"  # ingest | schedule | backfill
STAGE_TAG = "curation/stage"  # pool | recipe | report: for tag_concurrency_limits of the run queue
MODE_TAG = "curation/cluster_mode"
# on the jobs that write the cluster layout (pool_curation_job, lake_maintenance_job): the shipped
# instance's tag_concurrency_limits let one of them run at a time
LAYOUT_TAG = "curation/layout"
PARTITION_TAG = "dagster/partition"
BACKFILL_TAG = "dagster/backfill"

CLUSTER_MODES = ("auto", "retrain", "assign")  # concept_clusters' ConceptClustersConfig.mode


def pool_run_config(mode: str) -> dict:
    """Run config of ``pool_curation_job`` setting ``concept_clusters``' mode.

    ``auto``: assign new samples to the stored centroids (train only if none exist);
    ``retrain``: re-run k-means on the whole pool; ``assign``: assign only (fails without
    centroids).
    """
    if mode not in CLUSTER_MODES:
        raise ValueError(f"mode: got {mode!r}; expected one of {CLUSTER_MODES}")
    return {"ops": {"concept_clusters": {"config": {"mode": mode}}}}
