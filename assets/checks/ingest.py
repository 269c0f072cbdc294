"""Checks of the ingest stage, one property each (partitioned like the shards they guard).

Partitioned asset checks are a preview feature of Dagster 1.13 (``partitions_def`` on
``@asset_check``); the preview warning is silenced here, where it is known and intended.
"""



import dagster as dg
import polars as pl

from assets.ingest import samples
from assets.partitions import shard_partitions
from curation.ingest.shards import DEFAULT_MAX_CAPTION_BYTES, INGEST_STAGE, list_keys, shard_path
from resources import DatasetsResource, LakeResource




def _partition_rows(lake: LakeResource, table: str, key: str, columns: list[str]) -> pl.DataFrame:
    db = lake.lake()
    if not db.exists(table):
        return pl.DataFrame({c: [] for c in columns}, schema={c: pl.String for c in columns})
    return db.read(table, columns=columns, partitions=[key])


@dg.asset_check(
    asset=samples,
    partitions_def=shard_partitions,
    blocking=True,
    description="Every distinct key of the shard (tar members + parquet manifest, counted "
    "independently of the reader) is in exactly one of `samples` or ingest `quarantine`.",
)
def every_key_accounted_for(
    context: dg.AssetCheckExecutionContext, lake: LakeResource, datasets: DatasetsResource
) -> dg.AssetCheckResult:
    return key_accounting(lake, datasets, context.partition_key)


def key_accounting(lake: LakeResource, datasets: DatasetsResource, key: str) -> dg.AssetCheckResult:
    """The accounting property of shard ``key``: keys seen == samples + ingest quarantine.

    A shard deleted from the landing zone is accounted for by its tombstone: no samples rows
    and every quarantined key ``shard_deleted``.
    """
    path = shard_path(datasets.landing, key)
    if not path.is_file():
        s_n = _partition_rows(lake, "samples", key, ["key"]).height
        q = _partition_rows(lake, "quarantine", key, ["key", "stage", "reason"])
        q = q.filter(pl.col("stage") == INGEST_STAGE)
        bad = q.filter(pl.col("reason") != "shard_deleted").height
        return dg.AssetCheckResult(
            passed=s_n == 0 and q.height > 0 and bad == 0,
            metadata={
                "shard_file": "deleted",
                "samples": s_n,
                "tombstoned_keys": q.height - bad,
                "threshold": "a deleted shard: 0 samples rows, every ingest quarantine row shard_deleted",
            },
        )
    seen = list_keys(path)
    s_keys = _partition_rows(lake, "samples", key, ["key"])["key"].to_list()
    q = _partition_rows(lake, "quarantine", key, ["key", "stage"])
    q_keys = q.filter(pl.col("stage") == INGEST_STAGE)["key"].to_list()
    in_both = set(s_keys) & set(q_keys)
    accounted = set(s_keys) | set(q_keys)
    missing = sorted(seen - accounted)
    extra = sorted(accounted - seen)
    repeated = (len(s_keys) - len(set(s_keys))) + (len(q_keys) - len(set(q_keys)))
    passed = not missing and not extra and not in_both and repeated == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "keys_seen": len(seen),
            "samples": len(s_keys),
            "quarantined_ingest": len(q_keys),
            "observed_accounted": len(s_keys) + len(q_keys),
            "threshold": "samples + ingest quarantine == keys seen, no key twice",
            "missing_keys": dg.MetadataValue.json(missing[:20]),
            "unexpected_keys": dg.MetadataValue.json(extra[:20]),
            "keys_in_both": len(in_both),
            "repeated_rows": repeated,
        },
    )


@dg.asset_check(
    asset=samples,
    partitions_def=shard_partitions,
    description="uids are unique within the shard's `samples` partition (uid = hash(dataset, shard, key)).",
)
def uids_unique(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    key = context.partition_key
    uids = _partition_rows(lake, "samples", key, ["uid"])["uid"]
    n_dup = uids.len() - uids.n_unique()
    return dg.AssetCheckResult(
        passed=n_dup == 0,
        metadata={"rows": uids.len(), "duplicate_uids": n_dup, "threshold": 0},
    )


@dg.asset_check(
    asset=samples,
    partitions_def=shard_partitions,
    description="Every stored caption is clean text within the caption limit: at most "
    "max_caption_bytes UTF-8 bytes (longer ones are quarantined as caption_too_long, never "
    "truncated), no control characters but tab/newline, not empty.",
)
def captions_within_policy(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    return caption_policy(lake, context.partition_key)


def caption_policy(lake: LakeResource, key: str) -> dg.AssetCheckResult:
    caps = _partition_rows(lake, "samples", key, ["caption"])["caption"]
    nbytes = caps.str.len_bytes()
    too_long = int((nbytes > DEFAULT_MAX_CAPTION_BYTES).sum()) if caps.len() else 0
    control = int(caps.str.contains(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]").sum()) if caps.len() else 0
    empty = int((caps.str.strip_chars().str.len_chars() == 0).sum()) if caps.len() else 0
    q = _partition_rows(lake, "quarantine", key, ["reason"])
    quarantined = int((q["reason"] == "caption_too_long").sum()) if q.height else 0
    return dg.AssetCheckResult(
        passed=too_long == 0 and control == 0 and empty == 0,
        metadata={
            "captions": caps.len(),
            "max_caption_bytes_observed": int(nbytes.max() or 0) if caps.len() else 0,
            "threshold": f"<= {DEFAULT_MAX_CAPTION_BYTES} bytes, no control chars, not empty",
            "over_limit": too_long,
            "with_control_chars": control,
            "empty": empty,
            "quarantined_caption_too_long": quarantined,
        },
    )


CHECKS = [every_key_accounted_for, uids_unique, captions_within_policy]
