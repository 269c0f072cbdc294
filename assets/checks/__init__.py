"""Asset checks, one module per lineage stage, one property per check.

Partitioned asset checks are a preview feature of Dagster 1.13 (``partitions_def`` on
``@asset_check``); the preview warning is silenced here, once, where it is known and intended.
"""

import warnings

import dagster as dg

warnings.filterwarnings(
    "ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning
)
