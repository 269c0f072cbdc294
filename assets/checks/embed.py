"""Checks of the embeddings stage, one property each (partitioned like the shards they guard)."""


import dagster as dg
import numpy as np
import polars as pl

from assets.embed import embeddings
from assets.partitions import shard_partitions
from curation.storage.lake import list_column_to_matrix
from curation.embed.shard_embedding import EMBED_STAGE
from resources import LakeResource

NORM_TOLERANCE = 1e-3
_EMB = ("image_emb", "text_emb")


def _rows(lake: LakeResource, table: str, key: str, columns: list[str]) -> pl.DataFrame | None:
    db = lake.lake()
    if not db.exists(table):
        return None
    return db.read(table, columns=columns, partitions=[key])


def _matrices(df: pl.DataFrame) -> dict[str, np.ndarray]:
    return {c: list_column_to_matrix(df[c]) for c in _EMB}


@dg.asset_check(
    asset=embeddings,
    partitions_def=shard_partitions,
    blocking=True,
    description="No NaN or infinite value in any image or caption embedding of the shard.",
)
def embeddings_finite(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    return evaluate_finite(lake, context.partition_key)


def evaluate_finite(lake: LakeResource, key: str) -> dg.AssetCheckResult:
    """No NaN/inf in the partition's embeddings (observed: non-finite rows; threshold 0)."""
    df = _rows(lake, "embeddings", key, ["uid", *_EMB])
    if df is None:
        return dg.AssetCheckResult(passed=False, metadata={"error": "embeddings table does not exist"})
    mats = _matrices(df)
    bad = {c: int((~np.isfinite(m)).any(axis=1).sum()) for c, m in mats.items()}
    bad_rows = np.zeros(df.height, dtype=bool)
    for m in mats.values():
        bad_rows |= ~np.isfinite(m).all(axis=1)
    examples = df["uid"].filter(pl.Series(bad_rows)).head(10).to_list()
    return dg.AssetCheckResult(
        passed=int(bad_rows.sum()) == 0,
        metadata={
            "rows": df.height,
            "observed_nonfinite_rows": int(bad_rows.sum()),
            "nonfinite_image_rows": bad["image_emb"],
            "nonfinite_text_rows": bad["text_emb"],
            "threshold": 0,
            "example_uids": dg.MetadataValue.json(examples),
        },
    )


@dg.asset_check(
    asset=embeddings,
    partitions_def=shard_partitions,
    blocking=True,
    description=f"Every image and caption embedding has L2 norm within {NORM_TOLERANCE} of 1.",
)
def embeddings_unit_norm(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    return evaluate_unit_norm(lake, context.partition_key)


def evaluate_unit_norm(lake: LakeResource, key: str) -> dg.AssetCheckResult:
    """Every vector's norm within NORM_TOLERANCE of 1 (observed: max |norm - 1|)."""
    df = _rows(lake, "embeddings", key, ["uid", *_EMB])
    if df is None:
        return dg.AssetCheckResult(passed=False, metadata={"error": "embeddings table does not exist"})
    dev = {}
    worst = np.zeros(df.height, dtype=np.float64)
    for c, m in _matrices(df).items():
        d = np.abs(np.linalg.norm(m.astype(np.float64), axis=1) - 1.0) if len(m) else np.zeros(0)
        d = np.where(np.isfinite(d), d, np.inf)  # a NaN norm is a failure here too
        dev[c] = float(d.max()) if len(d) else 0.0
        worst = np.maximum(worst, d)
    n_off = int((worst > NORM_TOLERANCE).sum())
    observed = float(worst.max()) if len(worst) else 0.0
    return dg.AssetCheckResult(
        passed=n_off == 0,
        metadata={
            "rows": df.height,
            "observed_max_abs_norm_deviation": observed if np.isfinite(observed) else "inf/nan",
            "max_dev_image": dev.get("image_emb", 0.0) if np.isfinite(dev.get("image_emb", 0.0)) else "inf/nan",
            "max_dev_text": dev.get("text_emb", 0.0) if np.isfinite(dev.get("text_emb", 0.0)) else "inf/nan",
            "rows_off_unit_norm": n_off,
            "threshold": NORM_TOLERANCE,
        },
    )


@dg.asset_check(
    asset=embeddings,
    partitions_def=shard_partitions,
    blocking=True,
    description="Exactly one embeddings row per sample of the shard: the samples' uids minus the "
    "samples quarantined with stage `embed`, no uid twice.",
)
def embeddings_one_row_per_sample(
    context: dg.AssetCheckExecutionContext, lake: LakeResource
) -> dg.AssetCheckResult:
    return evaluate_one_row_per_sample(lake, context.partition_key)


def evaluate_one_row_per_sample(lake: LakeResource, key: str) -> dg.AssetCheckResult:
    """Embeddings uids == samples uids minus embed-quarantined keys, none twice."""
    samples = _rows(lake, "samples", key, ["uid", "key"])
    emb = _rows(lake, "embeddings", key, ["uid"])
    quar = _rows(lake, "quarantine", key, ["key", "stage"])
    if samples is None or emb is None:
        missing_tables = [n for n, d in (("samples", samples), ("embeddings", emb)) if d is None]
        return dg.AssetCheckResult(passed=False, metadata={"error": f"missing tables: {missing_tables}"})
    embed_q_keys = set() if quar is None else set(quar.filter(pl.col("stage") == EMBED_STAGE)["key"].to_list())
    expected = set(samples.filter(~pl.col("key").is_in(list(embed_q_keys)))["uid"].to_list())
    got = emb["uid"].to_list()
    got_set = set(got)
    missing = sorted(expected - got_set)
    extra = sorted(got_set - expected)
    duplicates = len(got) - len(got_set)
    passed = not missing and not extra and duplicates == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "samples": samples.height,
            "embed_quarantined": len(embed_q_keys),
            "expected_rows": len(expected),
            "observed_rows": len(got),
            "threshold": "observed == samples - embed quarantine, same uids, none twice",
            "missing_uids": len(missing),
            "unexpected_uids": len(extra),
            "duplicate_rows": duplicates,
            "missing_examples": dg.MetadataValue.json(missing[:10]),
            "unexpected_examples": dg.MetadataValue.json(extra[:10]),
        },
    )


CHECKS = [embeddings_finite, embeddings_unit_norm, embeddings_one_row_per_sample]
