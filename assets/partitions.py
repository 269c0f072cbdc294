"""Partitions: shards (dynamic, added by the landing sensor) and recipes (from the recipe config)."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

from curation.select.recipes import recipe_names

SHARDS = "shards"
shard_partitions = DynamicPartitionsDefinition(name=SHARDS)

# Adding a recipe to the config file adds a partition: a config change plus a backfill.
recipe_partitions = StaticPartitionsDefinition(recipe_names())
