"""Partitions: shards (dynamic, added by the landing sensor or ``curation shards register``)
and recipes (the names in the recipe config).

The recipe partitions read the recipe file (``$CURATION_RECIPES`` or the packaged
``curation/select/recipes.yaml``) the first time their keys are asked for, not when this
module is imported: importing the definitions reads neither the environment nor the file.
"""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

SHARDS = "shards"
shard_partitions = DynamicPartitionsDefinition(name=SHARDS)


class RecipePartitionsDefinition(StaticPartitionsDefinition):
    """A :class:`~dagster.StaticPartitionsDefinition` whose keys (the recipe names) are read
    from the recipe file on first use and then kept for the life of the process.

    Adding a recipe to the config file adds a partition: a config change plus a backfill.
    Every pruning recipe also gets its size-matched random control (curation.select.controls).
    """

    def __init__(self, path: str | None = None):
        self._path = path
        self._keys: list[str] | None = None

    @property
    def _partition_keys(self) -> list[str]:  # what StaticPartitionsDefinition reads everywhere
        if self._keys is None:
            from curation.select.controls import partition_names

            self._keys = list(partition_names(self._path))
        return self._keys

    # Dagster formats partitions definitions into messages while building assets: say what
    # they are without reading the recipe file. The hash must not change once keys are read.
    def __str__(self) -> str:
        return "recipe partitions (recipe file not read yet)" if self._keys is None else super().__str__()

    def __repr__(self) -> str:
        return f"RecipePartitionsDefinition(path={self._path!r})"

    def __hash__(self) -> int:
        return hash(("RecipePartitionsDefinition", self._path))

    def __eq__(self, other) -> bool:
        return super().__eq__(other)


recipe_partitions = RecipePartitionsDefinition()

