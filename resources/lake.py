"""The lake (Delta tables + artifact store) and the landing zone, as Dagster resources."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from curation.storage.lake import Lake
from curation.storage.data_home import (
    safe_child,
    default_artifacts_root,
    default_eval_root,
    default_lake_root,
    default_landing,
)


class LakeResource(ConfigurableResource):
    """Delta tables under ``root`` (local path or ``s3://``/``gs://``/``abfs://`` URI).

    ``storage_options`` go to deltalake as-is; put secrets there with ``EnvVar``, e.g.
    ``LakeResource(root="s3://bucket/lake", storage_options={"AWS_ACCESS_KEY_ID":
    EnvVar("AWS_ACCESS_KEY_ID"), ...})``. ``artifacts_root`` holds files that are not
    tables: subset exports, checkpoints, reports.
    """

    root: str = Field(default_factory=default_lake_root, description="Delta lake root URI")
    storage_options: dict[str, str] = Field(default_factory=dict, description="deltalake storage options")
    artifacts_root: str = Field(
        default_factory=default_artifacts_root, description="directory for exports, checkpoints, reports"
    )

    def lake(self) -> Lake:
        return Lake(root=self.root, storage_options=dict(self.storage_options))

    def artifacts(self, *parts: str) -> Path:
        p = safe_child(self.artifacts_root, *parts)  # names from config never escape the root
        p.mkdir(parents=True, exist_ok=True)
        return p


class DatasetsResource(ConfigurableResource):
    """Where raw shards land (``landing/<dataset>/<NNNNN>.tar``) and held-out eval sets live."""

    landing: str = Field(default_factory=default_landing, description="landing zone the sensor watches")
    eval_root: str = Field(default_factory=default_eval_root, description="held-out evaluation sets")
    max_pixels: int = Field(default=40_000_000, description="decompression-bomb limit (pixels per image)")
