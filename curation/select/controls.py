"""Size-matched random controls, derived automatically for every pruning recipe.

A pruning recipe is only evidence against a random subset of EXACTLY its size drawn from the
SAME candidate pool (after the same SemDeDup chain). The user does not declare these: every
recipe whose method is in :data:`PRUNING_METHODS` gets one, as an extra partition of every
per-recipe asset (:func:`partition_names`).

Which control a recipe gets (:func:`control_map`):

* a fraction recipe (``ssp``, ``dbp``, ``clipcov``, ``clipscore`` with ``keep_fraction``) keeps
  ``round(f * N_candidates)`` of the candidates after its chain: its control is ``random`` at the
  same ``f`` after the same chain -- exactly the same size on any pool. Recipes with the same
  ``(f, chain)`` share one control, named ``control:random@<f>`` plus
  ``+semdedup@eps=<eps>`` when chained. When the recipe file already declares an equivalent
  random recipe (same ``keep_fraction`` and ``after_semdedup_eps``), that recipe is the
  control and no partition is added.
* ``semdedup`` (dedup IS the treatment) keeps every non-duplicate: its control is a random
  subset of the whole pool of that size, ``control:<recipe>``.
* a threshold recipe (``clipscore`` with ``threshold``) keeps a data-dependent count: its
  control ``control:<recipe>`` draws the number of samples the recipe's materialized subset
  holds (materialize the recipe first).

A control's static :class:`Recipe` (:func:`resolve_recipe`) is a ``random`` recipe with the
chain of its target; :func:`finalize_control` turns it into the exact-size recipe once the
pool is known (``keep_fraction = n / N_candidates``, which :func:`n_keep_for` maps back to
exactly ``n``). Controls use seed :data:`CONTROL_SEED`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping

from curation.select.recipes import (
    Pool,
    Recipe,
    candidates,
    expected_keep,
    get_recipe,
    load_recipes,
)

log = logging.getLogger(__name__)

CONTROL_PREFIX = "control:"
PRUNING_METHODS = ("semdedup", "ssp", "dbp", "clipscore", "clipcov")
CONTROL_SEED = 0
CONTROLS_ENV = "CURATION_CONTROLS"


def controls_enabled() -> bool:
    """Controls are on unless ``CURATION_CONTROLS=off``."""
    v = os.environ.get(CONTROLS_ENV, "on").lower()
    if v not in ("on", "off"):
        raise ValueError(f"{CONTROLS_ENV}: got {v!r}; expected 'on' or 'off'")
    return v == "on"


def is_control(name: str) -> bool:
    """True for a derived control partition (``control:...``)."""
    return name.startswith(CONTROL_PREFIX)


def _static(target: Recipe) -> bool:
    """True when the target's size is ``round(f * N_candidates)`` (a fraction recipe after a chain)."""
    return target.method != "semdedup" and target.keep_fraction is not None


def _derived_name(target: Recipe) -> str:
    if _static(target):
        name = f"{CONTROL_PREFIX}random@{target.keep_fraction:g}"
        if target.after_semdedup_eps is not None:
            name += f"+semdedup@eps={target.after_semdedup_eps:g}"
        if target.train_strategy is not None:  # a control trains as its target trains
            name += f"+train={target.train_strategy}"
        return name
    return f"{CONTROL_PREFIX}{target.name}"


def _declared_equivalent(target: Recipe, recipes: Mapping[str, Recipe]) -> str | None:
    if not _static(target):
        return None
    for r in recipes.values():
        if (r.method == "random" and r.keep_fraction == target.keep_fraction and r.after_semdedup_eps == target.after_semdedup_eps
                and r.train_strategy == target.train_strategy):  # fmt: skip
            return r.name
    return None


def control_map(recipes: Mapping[str, Recipe] | None = None) -> dict[str, str]:
    """Pruning recipe name -> the name of its size-matched random control (declared or derived)."""
    recipes = load_recipes() if recipes is None else recipes
    out = {}
    for name, r in recipes.items():
        if r.method in PRUNING_METHODS:
            out[name] = _declared_equivalent(r, recipes) or _derived_name(r)
    return out


def control_names(recipes: Mapping[str, Recipe] | None = None) -> list[str]:
    """The derived control partitions (not declared in the recipe file), in recipe order."""
    if not controls_enabled():
        return []
    recipes = load_recipes() if recipes is None else recipes
    seen: list[str] = []
    for c in control_map(recipes).values():
        if is_control(c) and c not in seen:
            seen.append(c)
    return seen


def partition_names(path: str | None = None) -> list[str]:
    """Every per-recipe partition: the recipe file's names, then the derived controls."""
    recipes = load_recipes(path)
    return list(recipes) + control_names(recipes)


def control_targets(name: str, recipes: Mapping[str, Recipe] | None = None) -> list[str]:
    """The pruning recipes a control stands for."""
    return [t for t, c in control_map(recipes).items() if c == name]


def resolve_recipe(name: str, path: str | None = None) -> Recipe:
    """The :class:`Recipe` of any partition: a declared recipe, or a control's static recipe.

    A control's static recipe is ``random`` after its target's chain at the target's fraction
    (exact for fraction targets; :func:`finalize_control` sets the exact size of the others).
    """
    if not is_control(name):
        return get_recipe(name, path)
    recipes = load_recipes(path)
    targets = control_targets(name, recipes)
    if not targets:
        valid = control_names(recipes)
        raise ValueError(f"unknown control {name!r}; expected one of {valid}")
    t = recipes[targets[0]]
    if _static(t):
        return Recipe(name=name, method="random", keep_fraction=t.keep_fraction, after_semdedup_eps=t.after_semdedup_eps,
                      seed=CONTROL_SEED, train_strategy=t.train_strategy)  # fmt: skip
    return Recipe(name=name, method="random", keep_fraction=1.0, seed=CONTROL_SEED, train_strategy=t.train_strategy)


def needs_dedup_scores(name: str, path: str | None = None) -> bool:
    """True when building partition ``name`` needs SemDeDup scores (its own chain or its target's)."""
    if not is_control(name):
        return get_recipe(name, path).needs_dedup
    recipes = load_recipes(path)
    return any(recipes[t].needs_dedup for t in control_targets(name, recipes))


def control_size(name: str, pool: Pool, subset_size: Callable[[str], int] | None = None, path: str | None = None) -> int:
    """The exact number of samples control ``name`` must hold on ``pool``.

    Args:
        name: a control partition.
        pool: the pool (with ``max_sim`` when the target is chained or is ``semdedup``).
        subset_size: recipe name -> rows of its materialized subset (threshold targets only).
    """
    recipes = load_recipes(path)
    t = recipes[control_targets(name, recipes)[0]]
    n = expected_keep(t, int(candidates(t, pool).size))
    if n is None:
        if subset_size is None:
            raise ValueError(f"control {name!r}: target {t.name!r} keeps a data-dependent count; expected its subset materialized first")
        n = int(subset_size(t.name))
    return int(n)


def finalize_control(recipe: Recipe, pool: Pool, subset_size: Callable[[str], int] | None = None, path: str | None = None) -> Recipe:
    """The exact-size recipe of a control (unchanged for a declared recipe).

    ``keep_fraction = n / N_candidates`` with ``n`` from :func:`control_size`, so that
    ``apply_recipe`` keeps exactly ``n`` (``n_keep_for(n / N, N) == n``).
    """
    if not is_control(recipe.name):
        return recipe
    n = control_size(recipe.name, pool, subset_size, path)
    n_cand = int(candidates(recipe, pool).size)
    if not 0 < n <= n_cand:
        raise ValueError(f"control {recipe.name!r}: got target size {n}; expected 1..{n_cand} (the candidate pool)")
    return dataclasses.replace(recipe, keep_fraction=n / n_cand)


def control_pairs(names: list[str], recipes: Mapping[str, Recipe] | None = None) -> dict[str, str]:
    """For the given partition names: recipe -> control, keeping only pairs where both are present."""
    cm = control_map(recipes)
    present = set(names)
    return {t: c for t, c in cm.items() if t in present and c in present}


__all__ = [
    "CONTROL_PREFIX",
    "CONTROL_SEED",
    "PRUNING_METHODS",
    "control_map",
    "control_names",
    "control_pairs",
    "control_size",
    "control_targets",
    "finalize_control",
    "is_control",
    "needs_dedup_scores",
    "partition_names",
    "resolve_recipe",
]
