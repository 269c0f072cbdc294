"""Progress of long steps (embedding a shard, training a model) for whoever is listening.

The library stays free of the orchestrator: a long-running function takes an optional
``progress`` callable and calls :func:`report` at its natural checkpoints (every batch,
every ``log_every`` steps). The caller decides what to do with a :class:`ProgressEvent`;
the Dagster assets turn them into run-log events (``context.log`` + ``AssetObservation``), a
script may print them. A callback that raises is logged and ignored: progress never
breaks the work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    Attributes:
        stage: what is running (``"embed"``, ``"train"``).
        step: units done so far (batches or optimizer steps), 1-based.
        total: units in all (``None`` if unknown).
        samples: samples processed so far.
        samples_per_s: recent throughput.
        eta_s: seconds left, from the mean time per unit so far (``None`` without ``total``).
        elapsed_s: seconds since the start.
        extra: stage-specific numbers (``loss``, ``lr``, ...).
    """

    stage: str
    step: int
    total: int | None
    samples: int
    samples_per_s: float
    eta_s: float | None
    elapsed_s: float
    extra: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """``step / total`` (``None`` without a total)."""
        return None if not self.total else min(1.0, self.step / self.total)

    def as_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        """A one-line summary, e.g. ``train step 40/100 (40%), 5120 samples, 812 samples/s, ETA 8 s, loss 3.1``."""
        head = f"{self.stage} step {self.step}" + (f"/{self.total} ({self.fraction:.0%})" if self.total else "")
        parts = [head, f"{self.samples} samples", f"{self.samples_per_s:.0f} samples/s"]
        if self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.extra.items()]
        return ", ".join(parts)


class ProgressCallback(Protocol):
    """Anything callable with one :class:`ProgressEvent`."""

    def __call__(self, event: ProgressEvent) -> None: ...


def format_seconds(s: float) -> str:
    """``75.0`` -> ``"1m15s"``; ``8.2`` -> ``"8 s"``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def report(
    progress: Callable[[ProgressEvent], None] | None,
    stage: str,
    step: int,
    total: int | None,
    samples: int,
    elapsed_s: float,
    samples_per_s: float | None = None,
    **extra,
) -> ProgressEvent | None:
    """Build a :class:`ProgressEvent` and hand it to ``progress`` (no-op when ``None``).

    ``samples_per_s`` defaults to ``samples / elapsed_s``; the ETA is
    ``elapsed_s / step * (total - step)``.
    """
    if progress is None:
        return None
    rate = samples_per_s if samples_per_s is not None else samples / max(elapsed_s, 1e-9)
    eta = elapsed_s / step * (total - step) if (total and step > 0) else None
    ev = ProgressEvent(stage, int(step), None if total is None else int(total), int(samples), float(rate), eta, float(elapsed_s), dict(extra))
    try:
        progress(ev)
    except Exception as e:  # noqa: BLE001 - progress must never break the work
        log.warning("progress callback failed (%s: %s); continuing", type(e).__name__, e)
    return ev


class Throttle:
    """Wrap a callback so it is called at most every ``min_interval_s`` seconds (the first
    and the final event, ``step == total``, always pass)."""

    def __init__(self, callback: Callable[[ProgressEvent], None], min_interval_s: float = 5.0, clock=time.monotonic):
        self.callback = callback
        self.min_interval_s = float(min_interval_s)
        self._clock = clock
        self._last: float | None = None

    def __call__(self, event: ProgressEvent) -> None:
        now = self._clock()
        final = event.total is not None and event.step >= event.total
        if self._last is None or final or now - self._last >= self.min_interval_s:
            self._last = now
            self.callback(event)
