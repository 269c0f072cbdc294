"""Running the Dagster daemon in tests: start it on the shipped instance, wait for a condition
while it lives, and stop it with everything it started (by pid, its own process group)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from net_helpers import process_tree

REPO = Path(__file__).resolve().parents[1]


def shipped_dagster_home(path: Path) -> Path:
    """``path`` as a DAGSTER_HOME holding the shipped dagster.yaml (the daemon's config)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", path / "dagster.yaml")
    return path


def run_env(home: Path, dagster_home: Path, **extra: str) -> dict:
    """The environment of a run, job command or daemon on the data home ``home`` and the
    instance ``dagster_home``: the repo importable, one BLAS thread, no hub downloads."""
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                CURATION_HOME=str(home), DAGSTER_HOME=str(dagster_home), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def start_daemon(env: dict) -> subprocess.Popen:
    """``dagster-daemon run`` on the code location of ``workspace.yaml``, in a new session."""
    return subprocess.Popen(
        [sys.executable, "-m", "dagster._daemon", "run", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_for(what: str, fn, timeout_s: float, daemon: subprocess.Popen):
    """``fn()``'s first truthy value, polled while the daemon lives (its stderr if it dies)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if daemon.poll() is not None:
            raise AssertionError(f"the daemon exited while waiting for {what}: {daemon.stderr.read()[-3000:]}")
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything below it (by pid)."""
    if proc.poll() is None:
        tree = process_tree(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
