"""curation: the plain-Python library of the CLIP data-curation platform.

Data model, shard IO, encoders, clustering, de-duplication, pruning budgets, recipes,
training and evaluation. No Dagster here: the ``assets`` package adapts these functions
into software-defined assets.

The public names below are re-exported lazily (``curation.semdedup_scores`` imports
``curation.dedup`` on first use), so ``import curation`` stays cheap and never pulls in
torch unless a torch-backed name is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # storage and ids
    "Lake": "curation.lake",
    "make_uid": "curation.ids",
    "ComputeSpec": "curation.compute",
    # shards and datasets
    "read_shard": "curation.shards",
    "find_shards": "curation.shards",
    "load_members": "curation.shards",
    "write_shards": "curation.datasets",
    "build_default_dataset": "curation.datasets",
    # encoders and the pool
    "build_encoder": "curation.encoders",
    "embed_shard": "curation.pool",
    "read_pool": "curation.pool",
    # clustering, dedup, budgets, selection
    "train_centroids": "curation.clustering",
    "assign": "curation.clustering",
    "cluster_complexity": "curation.clustering",
    "semdedup_scores": "curation.dedup",
    "dbp_budgets": "curation.budgets",
    "ssp_budgets": "curation.budgets",
    "water_filling": "curation.budgets",
    "largest_remainder": "curation.budgets",
    "clipcov_select": "curation.clipcov",
    "get_recipe": "curation.recipes",
    "apply_recipe": "curation.recipes",
    "export_subset": "curation.export",
    # models, training, evaluation
    "register_model_configs": "curation.models",
    "TrainConfig": "curation.training",
    "train_clip": "curation.training",
    "train_from_shards": "curation.training",
    "load_checkpoint": "curation.training",
    "evaluate": "curation.evaluation",
    "zero_shot_metrics": "curation.evaluation",
    "retrieval_metrics": "curation.evaluation",
    "build_comparison": "curation.report",
    "write_report": "curation.report",
    "make_executor": "curation.distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'curation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
