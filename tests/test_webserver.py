"""The code location loads in a real dagster-webserver and shows the ingest assets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import shipped_dagster_home

REPO = Path(__file__).resolve().parent.parent
ASSET_QUERY = "{ assetNodes { assetKey { path } } }"
LOCATION_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the webserver's own process group (its pid), SIGKILL if it lingers, then reap."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def test_webserver_serves_the_asset_graph(tmp_path):
    exe = Path(sys.executable).parent / "dagster-webserver"
    if not exe.exists():
        pytest.fail(f"dagster-webserver not found next to {sys.executable}")
    home = shipped_dagster_home(tmp_path / "dagster_home")
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(home),
        CURATION_HOME=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    port = _free_port()
    log_path = tmp_path / "webserver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        deadline = time.monotonic() + 120
        paths: list[list[str]] = []
        last = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"webserver exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                loc = _graphql(url, LOCATION_QUERY)["data"]["workspaceOrError"]["locationEntries"]
                errors = [e["locationOrLoadError"] for e in loc if e["locationOrLoadError"]]
                if any(e["__typename"] == "PythonError" for e in errors):
                    pytest.fail(f"code location failed to load: {errors}")
                if errors and all(e["__typename"] == "RepositoryLocation" for e in errors):
                    paths = [n["assetKey"]["path"] for n in _graphql(url, ASSET_QUERY)["data"]["assetNodes"]]
                    if paths:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, KeyError, TypeError) as e:
                last = e
            time.sleep(1.0)
        else:
            pytest.fail(f"webserver did not serve the asset graph within 120 s (last error: {last})")
        keys = {"/".join(p) for p in paths}
        assert {"raw_shards", "samples"} <= keys
    finally:
        _stop(proc)
    assert proc.returncode is not None
