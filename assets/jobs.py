"""Jobs: the per-shard ingest job the landing sensor launches."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from assets.partitions import shard_partitions

# One run per new shard: the raw file, its samples (+ quarantine), its embeddings.
shard_ingest_job = define_asset_job(
    "shard_ingest_job",
    selection=AssetSelection.assets("raw_shards", "samples", "embeddings"),
    partitions_def=shard_partitions,
    description="Ingest one landed shard: raw_shards -> samples (+ quarantine) -> embeddings.",
)

JOBS = [shard_ingest_job]
