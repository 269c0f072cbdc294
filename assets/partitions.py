"""Partitions: shards (dynamic, added by the landing sensor) and recipes (from the recipe config)."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

from curation.select.controls import partition_names

SHARDS = "shards"
shard_partitions = DynamicPartitionsDefinition(name=SHARDS)

# Adding a recipe to the config file adds a partition: a config change plus a backfill.
# Every pruning recipe also gets its size-matched random control (curation.select.controls).
recipe_partitions = StaticPartitionsDefinition(partition_names())
