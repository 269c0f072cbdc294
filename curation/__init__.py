"""curation: the plain-Python library of the CLIP data-curation platform.

Packages follow the lineage (docs/architecture.md): ``ingest`` -> ``embed`` -> ``select`` ->
``train`` -> ``evaluate``, over a shared base of ``storage`` (the lake) and ``engine`` (compute
spec, executor). A stage imports only from itself, earlier stages and the base
(tests/test_layout.py). No Dagster here: the ``assets`` package adapts these functions
into software-defined assets.

The public names below are re-exported lazily (``curation.semdedup_scores`` imports
``curation.select.semdedup`` on first use), so ``import curation`` stays cheap and never pulls in
torch unless a torch-backed name is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # storage and ids
    "Lake": "curation.storage.lake",
    "make_uid": "curation.ingest.ids",
    "ComputeSpec": "curation.engine.compute",
    # shards and datasets
    "read_shard": "curation.ingest.shards",
    "find_shards": "curation.ingest.shards",
    "load_members": "curation.ingest.shards",
    "write_shards": "curation.ingest.shard_writer",
    "build_default_dataset": "curation.ingest.emoji_dataset",
    # encoders and the pool
    "build_encoder": "curation.embed.encoders",
    "embed_shard": "curation.embed.shard_embedding",
    "read_pool": "curation.embed.pool_reader",
    # clustering, dedup, budgets, selection
    "train_centroids": "curation.select.clustering",
    "assign": "curation.select.clustering",
    "cluster_complexity": "curation.select.clustering",
    "semdedup_scores": "curation.select.semdedup",
    "dbp_budgets": "curation.select.budgets",
    "ssp_budgets": "curation.select.budgets",
    "water_filling": "curation.select.budgets",
    "largest_remainder": "curation.select.budgets",
    "clipcov_select": "curation.select.clipcov",
    "get_recipe": "curation.select.recipes",
    "apply_recipe": "curation.select.recipes",
    "export_subset": "curation.select.export",
    # models, training, evaluation
    "register_model_configs": "curation.embed.model_registry",
    "TrainConfig": "curation.train.trainer",
    "train_clip": "curation.train.trainer",
    "train_from_shards": "curation.train.trainer",
    "load_checkpoint": "curation.train.trainer",
    "zero_shot_metrics": "curation.evaluate.evaluator",
    "retrieval_metrics": "curation.evaluate.evaluator",
    "build_comparison": "curation.evaluate.report",
    "write_report": "curation.evaluate.report",
    "make_executor": "curation.engine.executor",
    "semdedup_scores_distributed": "curation.select.semdedup",
    "clipcov_select_distributed": "curation.select.clipcov",
}

# ``evaluate`` (the function, in ``curation.evaluate.evaluator``) is not re-exported flat: the
# name is the ``curation.evaluate`` stage package.
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
