"""Deployment switches read when the definitions load."""

import os

import dagster as dg


def automation_status() -> dg.DefaultSensorStatus:
    """Default status of the automation sensors (landing zone -> ingest -> curation -> report).

    On by default, so a dataset dropped into the landing zone is curated end to end with no
    manual step. ``CURATION_AUTOMATION=off`` starts them stopped (tests that drive the UI by
    hand use it); they can always be toggled in the UI.
    """
    value = os.environ.get("CURATION_AUTOMATION", "on").lower()
    if value not in ("on", "off"):
        raise ValueError(f"CURATION_AUTOMATION: got {value!r}; expected 'on' or 'off'")
    return dg.DefaultSensorStatus.RUNNING if value == "on" else dg.DefaultSensorStatus.STOPPED


def filter_model_needed(recipes=None) -> tuple[bool, str]:
    """Whether ``filter_model`` must run: some recipe needs aligned CLIP embeddings
    (clipscore, clipcov). Reads the recipe file (``$CURATION_RECIPES``) when called, never
    at import. Returns ``(needed, reason)``."""
    from curation.select.recipes import load_recipes

    recipes = load_recipes() if recipes is None else recipes
    users = sorted(name for name, r in recipes.items() if r.needs_aligned)
    if users:
        return True, f"needed by {', '.join(users)}"
    return False, "skipped: no recipe in the recipe file needs aligned embeddings (clipscore/clipcov)"
