"""Scale-out: map a pure function over work items, in process or on Ray.

One small abstraction covers every embarrassingly parallel stage of the platform
(per-shard embedding, per-cluster SemDeDup, in-cluster ranking, per-class CLIPCov):

* ``address=None``    -> :class:`InProcessExecutor`, a plain loop. Ray is not imported.
* ``address="local"`` -> :class:`RayExecutor` on a local Ray instance started here
  (``ray.init(num_cpus=..., include_dashboard=False, log_to_driver=False)``), reachable from
  this machine only: every server of the instance (GCS, raylet, object manager, workers,
  dashboard and runtime-env agents) listens on loopback, because the instance is started in
  Ray's own local-only mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: the node IP is the
  loopback address, and Ray binds its servers to loopback when the node IP is loopback). Ray
  token authentication is on as well, with a random token per instance, so no other local
  process can submit work to it either.
* anything else       -> :class:`RayExecutor` connected to that cluster address
  (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``).

Both executors return results **in input order**, so the distributed path is a drop-in
replacement whose output is identical to the in-process one (tests/test_distributed.py
checks that parity). Large read-only inputs (the pool's embedding matrix) are passed as
``shared=`` keyword arguments: the Ray executor ``ray.put``s each of them once into the
object store and every task receives the same zero-copy reference, while items stay small
(e.g. arrays of member indices of one cluster).

GPUs: the number of GPUs a task or actor asks Ray for comes from
:func:`gpus_for_compute` on a :class:`curation.engine.compute.ComputeSpec` (or an explicit
``gpus_per_task``), so ``ComputeResource(device="cuda")`` schedules on GPU nodes.

Ray is an optional runtime dependency of the library: :mod:`ray` is imported only when a
:class:`RayExecutor` starts. Use an executor as a context manager (or call
:meth:`Executor.shutdown`): a Ray instance the executor started is shut down with it; one it
merely joined (``ray.is_initialized()`` already true) is left running.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.engine.compute import ComputeSpec

log = logging.getLogger(__name__)

LOCAL = "local"

__all__ = [
    "LOCAL",
    "DistributedConfig",
    "Executor",
    "InProcessExecutor",
    "RayExecutor",
    "make_executor",
    "gpus_for_compute",
    "cluster_members",
    "chunk_groups",
    "semdedup_scores_distributed",
    "clipcov_select_distributed",
]


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def gpus_for_compute(spec: ComputeSpec | None) -> float:
    """GPUs one task/actor should request for work that runs on ``spec``'s device.

    ``cpu`` -> 0; ``cuda`` / ``cuda:N`` -> 1 (whatever the driver has: on a cluster the
    driver may be a CPU node that schedules onto GPU workers); ``auto`` -> 1 if the
    *driver* sees CUDA, else 0 (the right answer on a single GPU box).
    """
    if spec is None or spec.device == "cpu":
        return 0.0
    if spec.device.startswith("cuda"):
        return 1.0
    return float(spec.gpus)


@dataclass(frozen=True)
class DistributedConfig:
    """Where and how to run mapped work.

    Attributes:
        address: ``None`` (in process, no Ray), ``"local"`` (start a local Ray instance), or a
            Ray cluster address passed to ``ray.init(address=...)``.
        num_cpus: CPUs of a *local* Ray instance (``None``: Ray's default, all cores).
            Ignored when joining a cluster.
        cpus_per_task: CPUs Ray reserves per task/actor (> 0).
        gpus_per_task: GPUs Ray reserves per task/actor (>= 0; fractional GPUs allowed).
        max_in_flight: at most this many tasks submitted and unfinished at once (bounds the
            object-store footprint of results); ``None``: all at once.
        object_store_memory: bytes of a local instance's object store (``None``: Ray's default).
    """

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_in_flight: int | None = None
    object_store_memory: int | None = None

    def __post_init__(self):
        if self.address is not None and not str(self.address).strip():
            raise ValueError(f"address: got {self.address!r}; expected None, 'local' or a Ray cluster address")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus: got {self.num_cpus}; expected None or >= 1")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task: got {self.cpus_per_task}; expected > 0")
        if self.gpus_per_task < 0:
            raise ValueError(f"gpus_per_task: got {self.gpus_per_task}; expected >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: got {self.max_in_flight}; expected None or >= 1")


# --------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------


class Executor:
    """Maps a pure function over items; results come back in input order.

    ``fn(item, **shared, **kwargs)`` must be a module-level (picklable) function with no side
    effects that matter (it may run in another process or on another machine).
    """

    kind: str = "abstract"

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        shared: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """``[fn(item, **shared, **kwargs) for item in items]``, possibly in parallel."""
        raise NotImplementedError

    def map_stateful(
        self,
        factory: Callable[[], Any],
        method: str,
        items: Iterable[Any],
        *,
        num_workers: int = 1,
        shared: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Like :meth:`map` for work that needs an expensive setup (a model loaded once).

        ``factory()`` builds a worker object once per worker (a Ray actor, or once in
        process); ``getattr(worker, method)(item, **shared, **kwargs)`` runs per item.
        """
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release what this executor started (no-op in process)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class InProcessExecutor(Executor):
    """A plain loop in the calling process; the reference every other executor must match."""

    kind = "in-process"

    def map(self, fn, items, *, shared=None, **kwargs):
        shared = dict(shared or {})
        return [fn(item, **shared, **kwargs) for item in items]

    def map_stateful(self, factory, method, items, *, num_workers=1, shared=None, **kwargs):
        worker = factory()
        call = getattr(worker, method)
        shared = dict(shared or {})
        return [call(item, **shared, **kwargs) for item in items]

    def __repr__(self) -> str:
        return "InProcessExecutor()"


def _call(fn, item, kwargs, *shared_refs_and_names):
    """Ray task body: resolve the shared object refs (passed top-level, so Ray fetches them
    zero-copy from the object store) and call ``fn``."""
    n = len(shared_refs_and_names) // 2
    names, values = shared_refs_and_names[:n], shared_refs_and_names[n:]
    return fn(item, **dict(zip(names, values)), **kwargs)


class _StatefulWorker:
    """Ray actor body for :meth:`RayExecutor.map_stateful`."""

    def __init__(self, factory):
        self._obj = factory()

    def call(self, method, item, kwargs, *shared_refs_and_names):
        n = len(shared_refs_and_names) // 2
        names, values = shared_refs_and_names[:n], shared_refs_and_names[n:]
        return getattr(self._obj, method)(item, **dict(zip(names, values)), **kwargs)


class RayExecutor(Executor):
    """Runs :meth:`map` as Ray tasks and :meth:`map_stateful` on a pool of Ray actors.

    Starts (``address="local"``) or joins (a cluster address) Ray lazily on first use. If Ray
    is already initialized in this process the executor reuses it and leaves it running.
    """

    kind = "ray"

    def __init__(self, config: DistributedConfig):
        if config.address is None:
            raise ValueError("RayExecutor needs an address: 'local' or a Ray cluster address; got None")
        self.config = config
        self._owns_ray = False
        self._ray = None

    # -- lifecycle -------------------------------------------------------------------
    def _ensure_ray(self):
        if self._ray is not None:
            return self._ray
        import ray

        if ray.is_initialized():
            log.info("joining the Ray instance already initialized in this process")
        else:
            cfg = self.config
            if cfg.address == LOCAL:
                kwargs: dict[str, Any] = {
                    "num_cpus": cfg.num_cpus,
                    "include_dashboard": False,
                    "log_to_driver": False,
                }
                # Loopback only: Ray binds every server of a node to loopback when the node IP
                # is loopback, and picks the loopback IP in its local-only mode (ray.init maps
                # ``_node_ip_address="127.0.0.1"`` back to the outward IP, so that is no way).
                self._restore_env = _loopback_only()
                # And a random per-instance token on every RPC (Ray token authentication), so
                # no other local process can submit work either.
                self._set_auth = _enable_token_auth()
                if cfg.object_store_memory is not None:
                    kwargs["object_store_memory"] = int(cfg.object_store_memory)
                log.info("starting a local Ray instance (num_cpus=%s)", cfg.num_cpus)
                ray.init(**kwargs)
            else:
                log.info("connecting to the Ray cluster at %s", cfg.address)
                ray.init(address=cfg.address, log_to_driver=False)
            self._owns_ray = True
        self._ray = ray
        return ray

    def shutdown(self) -> None:
        for var in getattr(self, "_set_auth", ()):
            os.environ.pop(var, None)
        self._set_auth = ()
        if self._ray is not None and self._owns_ray:
            log.info("shutting down the Ray instance this executor started")
            self._ray.shutdown()
        restore = getattr(self, "_restore_env", None)
        if restore is not None:
            restore()
        self._restore_env = None
        self._ray = None
        self._owns_ray = False

    # -- helpers ---------------------------------------------------------------------
    def _put_shared(self, ray, shared: Mapping[str, Any] | None) -> tuple:
        """``ray.put`` every shared value once; returns ``(*names, *refs)`` for the task args."""
        shared = dict(shared or {})
        names = tuple(shared)
        refs = tuple(ray.put(shared[k]) for k in names)
        return names + refs

    def _gather_in_order(self, ray, submit: Callable[[int, Any], Any], items: Sequence[Any]) -> list[Any]:
        """Submit ``submit(i, item)`` for every item with at most ``max_in_flight`` pending;
        collect results by index so the output order is the input order."""
        limit = self.config.max_in_flight or len(items) or 1
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        nxt = 0
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < limit:
                pending[submit(nxt, items[nxt])] = nxt
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
        return results

    # -- mapping ---------------------------------------------------------------------
    def map(self, fn, items, *, shared=None, **kwargs):
        items = list(items)
        if not items:
            return []
        ray = self._ensure_ray()
        cfg = self.config
        task = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task)(_call)
        shared_args = self._put_shared(ray, shared)
        fn_ref = ray.put(fn)
        return self._gather_in_order(ray, lambda i, item: task.remote(fn_ref, item, kwargs, *shared_args), items)

    def map_stateful(self, factory, method, items, *, num_workers=1, shared=None, **kwargs):
        items = list(items)
        if not items:
            return []
        if num_workers < 1:
            raise ValueError(f"num_workers: got {num_workers}; expected >= 1")
        ray = self._ensure_ray()
        cfg = self.config
        actor_cls = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task)(_StatefulWorker)
        actors = [actor_cls.remote(factory) for _ in range(min(num_workers, len(items)))]
        shared_args = self._put_shared(ray, shared)
        try:
            # Round-robin assignment keeps it deterministic; each actor runs its calls in order.
            return self._gather_in_order(
                ray,
                lambda i, item: actors[i % len(actors)].call.remote(method, item, kwargs, *shared_args),
                items,
            )
        finally:
            for a in actors:
                ray.kill(a)

    def __repr__(self) -> str:
        return f"RayExecutor({self.config})"


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> Callable[[], None]:
    """Start the next local Ray instance in Ray's local-only mode: node IP = loopback.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` into ``ray_constants.ENABLE_RAY_CLUSTER``
    when it is imported; with it off, ``get_node_ip_address()`` is the loopback IP (Ray's
    default on macOS and Windows), and Ray's servers bind to loopback when the node IP is
    loopback (the GCS, raylet, object manager and core workers in C++, the dashboard and
    runtime-env agents in Python). The variable is set for the processes Ray starts; if Ray
    is already imported here, its constant is switched too. Returns a function that puts both
    back (called on shutdown).
    """
    before = os.environ.get(LOCAL_ONLY_ENV)
    os.environ[LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        if before is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = before
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:  # what Ray would have read from the restored environment
            constants.ENABLE_RAY_CLUSTER = constants.env_bool(LOCAL_ONLY_ENV, not constants.IS_WINDOWS_OR_OSX)

    return restore


def _enable_token_auth() -> tuple[str, ...]:
    """Turn on Ray token authentication for a local instance unless the user configured auth.

    Returns the environment variables set here (removed again on shutdown).
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return ()
    if "ray" in sys.modules and "ray._raylet" in sys.modules:
        # Ray reads the auth mode once, when it is imported: switching it on now would give
        # the GCS a token mode its own driver does not use. Dagster step processes import Ray
        # here, lazily, so this only happens where something imported Ray earlier.
        log.warning("Ray was imported before the local instance started; starting it without token auth")
        return ()
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return ("RAY_AUTH_MODE",)
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def make_executor(config: DistributedConfig | None = None) -> Executor:
    """The executor for ``config``: in process when ``config`` or its address is ``None``."""
    if config is None or config.address is None:
        return InProcessExecutor()
    return RayExecutor(config)


def run_beside(background: Callable[[], Any], foreground: Callable[[], Any]) -> Any:
    """Run ``background()`` on one other thread while ``foreground()`` runs here (two pieces of
    Rust/numpy work that release the GIL overlap on two cores); wait for both and return what
    ``foreground`` returned. An error of ``foreground`` propagates (after ``background`` has
    ended); else an error of ``background`` does."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(background)
        try:
            out = foreground()
        finally:
            failed = done.exception()  # waits for the background work
    if failed is not None:
        raise failed
    return out


# Grouping helpers for per-cluster and per-class work


def cluster_members(cluster_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Group sample indices by cluster.

    Args:
        cluster_ids: (n,) int, the cluster of every sample.
    Returns:
        ``[(cluster_id, idx), ...]`` sorted by cluster id; ``idx`` is an (m,) int64 array of
        the member indices in ascending order. Empty clusters are absent.
    """
    cluster_ids = np.asarray(cluster_ids)
    order = np.argsort(cluster_ids, kind="stable")
    sorted_ids = cluster_ids[order]
    cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
    groups = np.split(order.astype(np.int64), cuts)
    return [(int(cluster_ids[g[0]]), np.sort(g)) for g in groups if len(g)]


def chunk_groups(groups: Sequence[Any], sizes: Sequence[int], rows_per_task: int) -> list[list[Any]]:
    """Pack consecutive groups into chunks of about ``rows_per_task`` rows (one task each).

    Many small clusters would otherwise cost one scheduler round trip each; a group larger
    than ``rows_per_task`` gets a chunk of its own. Order is preserved.
    """
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task: got {rows_per_task}; expected >= 1")
    chunks: list[list[Any]] = []
    cur: list[Any] = []
    rows = 0
    for g, n in zip(groups, sizes):
        if cur and rows + n > rows_per_task:
            chunks.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += int(n)
    if cur:
        chunks.append(cur)
    return chunks


