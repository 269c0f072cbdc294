"""Dagster ConfigurableResources: the lake, the landing zone, compute, encoders, distributed engine.

They hold config and build clients from ``curation``; they hold no mutable state.
"""

from resources.compute import ComputeResource
from resources.encoder import EncoderResource
from resources.lake import DatasetsResource, LakeResource

__all__ = ["ComputeResource", "EncoderResource", "DatasetsResource", "LakeResource"]
