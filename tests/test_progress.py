"""Progress events: ETA and rate from hand-computed numbers, throttling, a failing callback."""

import pytest

from curation.engine.progress import ProgressEvent, Throttle, format_seconds, report


def test_report_computes_rate_and_eta():
    got = []
    ev = report(got.append, "train", step=25, total=100, samples=3200, elapsed_s=10.0, loss=2.5)
    assert got == [ev]
    assert ev.samples_per_s == pytest.approx(320.0) and ev.eta_s == pytest.approx(30.0) and ev.fraction == 0.25
    assert ev.message() == "train step 25/100 (25%), 3200 samples, 320 samples/s, ETA 30 s, loss 2.5"
    assert report(None, "x", 1, 2, 3, 1.0) is None


def test_a_failing_callback_never_breaks_the_work(caplog):
    def boom(ev):
        raise RuntimeError("ui down")

    assert report(boom, "embed", 1, 2, 10, 1.0) is not None
    assert "progress callback failed" in caplog.text


def test_throttle_passes_first_and_last_only_within_the_interval():
    t = [0.0]
    seen = []
    th = Throttle(seen.append, min_interval_s=5.0, clock=lambda: t[0])
    for step in range(1, 11):
        t[0] = step * 1.0
        th(ProgressEvent("embed", step, 10, step, 1.0, None, t[0]))
    assert [e.step for e in seen] == [1, 6, 10]


def test_format_seconds():
    assert format_seconds(8.2) == "8 s" and format_seconds(75) == "1m15s" and format_seconds(3725) == "1h02m"
