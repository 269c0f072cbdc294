"""Run-worker health on one machine: a SIGKILLed run is marked failed, not STARTED forever.

Dagster's ``DefaultRunLauncher`` starts each run in a subprocess of the local code server but
cannot tell the run monitoring daemon whether that process is still alive
(``supports_check_run_worker_health`` is False), so a run whose worker was killed (OOM killer,
``kill -9``, a crashed machine) stays ``STARTED`` until ``max_runtime_seconds`` -- and every
sensor that waits for in-progress runs waits with it.

:class:`LocalRunLauncher` is the ``DefaultRunLauncher`` plus that health check: the run
worker's pid is the one in the run's ``"Started process for run (pid: N)"`` engine event; a
pid that no longer exists (or is a zombie, or is some other program now) is a dead worker, so
run monitoring (``run_monitoring`` in ``dagster_home/dagster.yaml``) marks the run FAILED and
run retries (``run_retries``, not on asset failures) launch it again. The sensors use
:func:`run_worker_dead` as a guard of their own so they never wait on a dead run even where
the daemon's monitoring is off. Only meaningful when the code server runs on this machine
(the shipped setup); elsewhere the pid is unknown and the run counts as alive.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

_STARTED_MSG = "Started process for run"


def run_worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid of a run's worker process from its engine events (None when not recorded)."""
    fallback = None
    for rec in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        ev = rec.dagster_event
        data = getattr(ev, "event_specific_data", None) if ev is not None else None
        meta = getattr(data, "metadata", None) or {}
        if "pid" not in meta:
            continue
        try:
            pid = int(getattr(meta["pid"], "value", meta["pid"]))
        except (TypeError, ValueError):
            continue
        if (ev.message or "").startswith(_STARTED_MSG):
            return pid
        fallback = fallback if fallback is not None else pid
    return fallback


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) Python/dagster process on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no procfs (macOS): existence is all we can know
    try:
        stat = (proc / "stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    # a recycled pid running something else is not our worker
    return b"python" in cmdline or b"dagster" in cmdline


def run_worker_dead(instance: DagsterInstance, run: DagsterRun) -> bool:
    """True when a STARTED run's worker process is known to be gone (killed)."""
    if run.status != DagsterRunStatus.STARTED:
        return False
    pid = run_worker_pid(instance, run.run_id)
    return pid is not None and not pid_alive(pid)


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` whose run workers run monitoring can check (module docstring)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        instance = self._instance
        pid = run_worker_pid(instance, run.run_id)
        if pid is None:
            # no pid to check (launched some other way): never fail a run we cannot see
            return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker pid not recorded")
        if pid_alive(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        fresh = instance.get_run_by_id(run.run_id)
        if fresh is not None and fresh.status == DagsterRunStatus.SUCCESS:
            return CheckRunHealthResult(WorkerStatus.SUCCESS)
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"run worker process (pid {pid}) is gone: killed or crashed without reporting"
        )
