"""Helpers for the browser test: Debian's Chromium through Playwright, the Dagster GraphQL API.

Never downloads a browser: Playwright drives ``/usr/bin/chromium`` (``apt-get install
chromium``; the Makefile's ``chromium`` target installs it for CI).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CURATION_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skip when Chromium or Playwright is missing; FAIL instead when ``CI=true``."""
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"Chromium not found at {CHROMIUM} (install it: `apt-get install -y chromium` or `make chromium`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package playwright is not installed (pip install -e '.[test]')")
    if not problems:
        return
    msg = "browser test cannot run: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def graphql(base_url: str, query: str, variables: dict | None = None, timeout: float = 30.0) -> dict:
    """POST a query to the webserver's GraphQL endpoint; returns ``data`` (raises on errors)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{base_url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.load(r)
    if out.get("errors"):
        raise RuntimeError(f"GraphQL errors: {out['errors']}")
    return out["data"]


RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter, limit: 20) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
  }
}
"""

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def wait_for_partition_run(base_url: str, partition: str, timeout: float = 150.0) -> dict:
    """Poll GraphQL until a run tagged ``dagster/partition=<partition>`` is terminal; return it."""
    deadline = time.monotonic() + timeout
    last = None
    flt = {"tags": [{"key": "dagster/partition", "value": partition}]}
    while time.monotonic() < deadline:
        runs = graphql(base_url, RUNS_QUERY, {"filter": flt})["runsOrError"]["results"]
        if runs:
            last = runs[0]
            if last["status"] in TERMINAL:
                return last
        time.sleep(1.0)
    raise TimeoutError(f"no finished run for partition {partition!r} within {timeout:.0f} s (last: {last})")


def dismiss_popups(page, wait_ms: int = 3000) -> None:
    """Close the first-visit 'Join the Dagster community' dialog if it shows up."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=wait_ms)
    except Exception:  # playwright TimeoutError: no dialog this time
        return
    skip.click()


def graph_labels(page) -> list[str]:
    """Texts of the elements in the page that contain exactly one text node (node labels)."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('body *'))
              .filter(e => e.childElementCount === 0 && e.textContent.trim().length > 0)
              .map(e => e.textContent.trim())"""
    )


def label_matches(label: str, name: str) -> bool:
    """``label`` is ``name`` or its middle-truncated form (``train…_checkpoints``)."""
    if label == name:
        return True
    if label.count("…") != 1:
        return False
    head, tail = label.split("…")
    return bool(head) and bool(tail) and name.startswith(head) and name.endswith(tail) and len(head) + len(tail) < len(name)


def missing_from_graph(page, names) -> list[str]:
    """The names no label of the page shows (exactly or middle-truncated)."""
    labels = graph_labels(page)
    return [n for n in names if not any(label_matches(lb, n) for lb in labels)]


IMAGES_JS = """(root) => Array.from((root || document).querySelectorAll('img')).map(i => ({
    alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
    width: i.getBoundingClientRect().width, height: i.getBoundingClientRect().height,
    data: (i.currentSrc || i.src || '').startsWith('data:image/')}))"""


def decoded_images(locator, minimum: int = 1, timeout_ms: int = 30_000) -> list[dict]:
    """The ``<img>`` elements under ``locator`` once at least ``minimum`` of them are decoded
    (``complete`` and ``naturalWidth > 0``); each as ``{alt, naturalWidth, width, height, ...}``.

    Raises AssertionError when fewer than ``minimum`` decode within ``timeout_ms``.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    imgs: list[dict] = []
    while time.monotonic() < deadline:
        imgs = locator.evaluate(IMAGES_JS)
        ok = [i for i in imgs if i["complete"] and i["naturalWidth"] > 0 and i["width"] > 0 and i["height"] > 0]
        if len(ok) >= minimum:
            return imgs
        time.sleep(0.3)
    raise AssertionError(f"expected >= {minimum} decoded images with a non-zero size; got {imgs[:5]} ...")


def open_markdown_metadata(page, key: str):
    """Open the ``[Show Markdown]`` dialog of metadata entry ``key`` on an asset page and
    return the dialog locator."""
    row = page.locator("tr").filter(has=page.get_by_text(key, exact=True)).first
    row.scroll_into_view_if_needed()
    row.get_by_text("[Show Markdown]").first.click()
    dialog = page.get_by_role("dialog").last
    dialog.wait_for(state="visible")
    return dialog
