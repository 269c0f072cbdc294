"""Backfill of the recipe assets over recipes, from the CLI (the same kind the UI launches).

``backfill_recipes(instance, recipes=None)`` submits an asset backfill of pruned_subsets,
trained_checkpoints and eval_reports over recipe partitions plus ``curation_report`` after
them; the daemon of the instance (``curation ui`` / ``dagster dev``) launches its runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dagster import AssetKey, DagsterInstance

from assets.jobs import _valid_recipes
from assets.stages import RECIPE_ASSETS, REPORT_ASSETS, TRIGGER_TAG

log = logging.getLogger(__name__)


MAX_TITLE = 100  # Dagster rejects longer backfill titles


def backfill_title(recipes: Sequence[str]) -> str:
    """``"recipes: a, b, c"``, or ``"recipes: a, b, ... (N recipes)"`` within Dagster's 100 characters."""
    title = f"recipes: {', '.join(recipes)}"
    if len(title) <= MAX_TITLE:
        return title
    shown: list[str] = []
    for r in recipes:
        candidate = f"recipes: {', '.join([*shown, r])}, ... ({len(recipes)} recipes)"
        if len(candidate) > MAX_TITLE:
            break
        shown.append(r)
    return f"recipes: {', '.join(shown)}, ... ({len(recipes)} recipes)" if shown else f"{len(recipes)} recipes"


def backfill_recipes(
    instance: DagsterInstance,
    recipes: Sequence[str] | None = None,
    defs=None,
    include_report: bool = True,
    tags: dict[str, str] | None = None,
) -> str:
    """Submit an asset backfill of the recipe assets over ``recipes`` (default: all).

    The backfill targets pruned_subsets, trained_checkpoints and eval_reports for each recipe
    partition and, with ``include_report``, curation_report after them. The daemon of the
    instance (``curation ui`` / ``dagster dev``) launches its runs; it shows in the UI's
    Backfills tab like one launched there.

    Returns:
        The backfill id.
    """
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._time import get_current_timestamp

    if defs is None:
        from assets.definitions import defs as _defs  # noqa: PLC0415 (definitions never import this module)

        defs = _defs
    partition_names = _valid_recipes(recipes)
    selection = [AssetKey(k) for k in RECIPE_ASSETS + (REPORT_ASSETS if include_report else ())]
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(),
        asset_graph=defs.resolve_asset_graph(),
        partition_names=partition_names,
        asset_selection=selection,
        backfill_timestamp=get_current_timestamp(),
        tags={TRIGGER_TAG: "backfill", **(tags or {})},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=backfill_title(partition_names),
        description="backfill of the recipe assets (and the report) over recipes: " + ", ".join(partition_names),
        run_config=None,
    )
    instance.add_backfill(backfill)
    log.info("submitted backfill %s over %d recipe(s)", backfill.backfill_id, len(partition_names))
    return backfill.backfill_id
