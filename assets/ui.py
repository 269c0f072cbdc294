"""Start and stop the Dagster UI (``dagster dev``: webserver + daemon) from Python.

``curation ui`` and the browser test use these. The UI runs on the same instance the demo
used: ``DAGSTER_HOME`` defaults to the repo's ``dagster_home/`` (its shipped ``dagster.yaml``
turns telemetry off and queues runs) and ``CURATION_HOME`` to ``./data``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DAGSTER_HOME = REPO_ROOT / "dagster_home"


def dagster_executable() -> Path:
    """The ``dagster`` console script of this interpreter's environment (the venv's bin dir)."""
    exe = Path(sys.executable).parent / "dagster"
    if not exe.exists():
        raise FileNotFoundError(f"dagster executable not found next to {sys.executable}: {exe}")
    return exe


def _restore_default_signals() -> None:  # runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def ui_env(dagster_home: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the UI process: the caller's, plus ``env``, plus defaults for
    ``DAGSTER_HOME`` (repo ``dagster_home/``), ``CURATION_HOME`` (``./data``) and offline model
    loading. The instance dir gets the shipped ``dagster.yaml`` if it has none (telemetry off)."""
    out = dict(os.environ)
    out.update(env or {})
    home = Path(dagster_home or out.get("DAGSTER_HOME") or SHIPPED_DAGSTER_HOME).absolute()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(SHIPPED_DAGSTER_HOME / "dagster.yaml", home / "dagster.yaml")
    out["DAGSTER_HOME"] = str(home)
    out["CURATION_HOME"] = str(Path(out.get("CURATION_HOME") or "data").absolute())
    out.setdefault("HF_HUB_OFFLINE", "1")
    out.setdefault("TRANSFORMERS_OFFLINE", "1")
    return out


def wait_for_ui(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Poll ``url`` (``.../server_info``) until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Dagster UI process exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s (last error: {last})")


def start_ui(
    host: str = "127.0.0.1",
    port: int = 3000,
    dagster_home: str | os.PathLike | None = None,
    workspace: str | os.PathLike = "workspace.yaml",
    env: Mapping[str, str] | None = None,
    log_file: str | os.PathLike | None = None,
    timeout: float = 180.0,
) -> subprocess.Popen:
    """Run ``dagster dev -w WORKSPACE -h HOST -p PORT`` and wait until the UI answers.

    Args:
        host, port: where the webserver listens.
        dagster_home: the instance directory (default ``$DAGSTER_HOME`` or the repo's
            ``dagster_home/``).
        workspace: the workspace file, relative to the repo root unless absolute.
        env: extra environment variables for the UI process (e.g. ``CURATION_HOME``).
        log_file: where the UI's stdout/stderr go (default: inherited from the caller).
        timeout: seconds to wait for ``http://HOST:PORT/server_info``.
    Returns:
        The process, leader of its own session/process group; stop it with :func:`stop_ui`.
    """
    workspace = Path(workspace)
    if not workspace.is_absolute():
        workspace = REPO_ROOT / workspace
    if not workspace.exists():
        raise FileNotFoundError(f"workspace file not found: {workspace}")
    cmd = [str(dagster_executable()), "dev", "-w", str(workspace), "-h", host, "-p", str(int(port))]
    out = open(log_file, "ab") if log_file is not None else None  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=str(REPO_ROOT),
            env=ui_env(dagster_home, env),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_restore_default_signals,
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor
    log.info("started the Dagster UI (pid %d): %s", proc.pid, " ".join(cmd))
    try:
        wait_for_ui(f"http://{host}:{port}/server_info", proc, timeout=timeout)
    except BaseException:
        stop_ui(proc)
        raise
    return proc


def stop_ui(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """Stop the UI: SIGTERM to its process group (its own pid), then SIGKILL after ``timeout``.

    Returns the exit code (``None`` if it could not be reaped).
    """
    pgid = proc.pid  # start_new_session=True: the process leads its own group
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            # children (webserver, daemon, code server) may outlive the leader briefly
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue  # group still alive: escalate
            break
        except subprocess.TimeoutExpired:
            log.warning("the Dagster UI did not stop on %s; escalating", sig.name)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None
