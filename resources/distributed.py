"""The distributed engine as a Dagster resource (bound as ``"distributed"``)."""

from __future__ import annotations

from typing import Optional

from dagster import ConfigurableResource
from pydantic import Field

from curation.engine.compute import ComputeSpec
from curation.engine.executor import DistributedConfig, Executor, gpus_for_compute, make_executor


class DistributedResource(ConfigurableResource):
    """Where per-shard / per-cluster work runs: in process (default), a local Ray, or a cluster.

    ``address``: ``None`` runs a plain loop in the step's process (no Ray import);
    ``"local"`` starts a local Ray instance for the step; any other value is a Ray cluster
    address (``"auto"`` on a Ray node, ``"ray://head:10001"`` for Ray Client).
    ``gpus_per_task``: ``None`` derives it from the step's compute spec
    (``ComputeResource(device="cuda")`` -> 1 GPU per task/actor, ``cpu`` -> 0).

    Use it in an asset as::

        with distributed.executor(compute.spec()) as ex:
            results = ex.map(per_cluster_fn, groups, shared={"x": embeddings})
    """

    address: Optional[str] = Field(
        default=None, description="None (in process), 'local' (local Ray), or a Ray cluster address"
    )
    num_cpus: Optional[int] = Field(default=None, description="CPUs of a local Ray instance (None: all)")
    cpus_per_task: float = Field(default=1.0, description="CPUs Ray reserves per task/actor")
    gpus_per_task: Optional[float] = Field(
        default=None, description="GPUs per task/actor; None: 1 if the compute device is CUDA, else 0"
    )
    max_in_flight: Optional[int] = Field(
        default=None, description="cap on submitted-but-unfinished tasks (bounds object-store use)"
    )
    object_store_memory: Optional[int] = Field(
        default=None, description="object store bytes of a local Ray instance (None: Ray's default)"
    )

    def config(self, compute: ComputeSpec | None = None) -> DistributedConfig:
        """The plain-data config; GPUs per task resolved from ``compute`` when not set."""
        if self.address is None:
            gpus = 0.0  # in process: nothing to reserve
        elif self.gpus_per_task is not None:
            gpus = float(self.gpus_per_task)
        else:
            gpus = gpus_for_compute(compute)
        return DistributedConfig(
            address=self.address,
            num_cpus=self.num_cpus,
            cpus_per_task=self.cpus_per_task,
            gpus_per_task=gpus,
            max_in_flight=self.max_in_flight,
            object_store_memory=self.object_store_memory,
        )

    def executor(self, compute: ComputeSpec | None = None) -> Executor:
        """A fresh executor (use it as a context manager so a Ray it started is shut down)."""
        return make_executor(self.config(compute))
