"""DBP-vs-SSP diagnostics on hand-computed budgets, the tau sweep and the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curation.select.diagnostics import (
    dbp_vs_ssp,
    diagnostics_markdown,
    plot_keep_vs_complexity,
    tau_sweep,
)


def test_flat_weights_make_dbp_equal_ssp():
    r = dbp_vs_ssp(np.array([10, 10]), np.array([0.5, 0.5]), 10, balance=0.0)
    assert r["tv"] == 0.0 and r["kl"] == pytest.approx(0.0) and r["weight_cv"] == 0.0
    assert r["weight_uniform"] == 0.5 and r["at_capacity"] == 0.0


def test_skewed_weights_by_hand():
    # dbp = [9, 1], ssp = [5, 5]: tv = (4 + 4) / 2 / 10, KL = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5)
    r = dbp_vs_ssp(np.array([10, 10]), np.array([0.9, 0.1]), 10, balance=0.0)
    assert r["tv"] == pytest.approx(0.4)
    assert r["kl"] == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    assert r["weight_min"] == pytest.approx(0.1) and r["weight_max"] == pytest.approx(0.9)
    assert r["weight_cv"] == pytest.approx(0.8)  # std 0.4 / mean 0.5


def test_tau_sweep_spreads_budgets_as_tau_falls(tmp_path):
    rng = np.random.default_rng(0)
    k, n = 6, 600
    cent = rng.normal(size=(k, 8)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    cid = np.arange(n) % k
    # clusters differ in spread: cos to centroid from 0.95 (tight) to 0.45 (diffuse)
    cos = np.concatenate([np.full(n // k, 0.95 - 0.1 * j) for j in range(k)])[np.argsort(np.argsort(cid, kind="stable"))]
    sw = tau_sweep(cid, cos, cent, 200, taus=(0.01, 0.5, 100.0), balance=0.0)
    assert sw["tau"].to_list() == [0.01, 0.5, 100.0]
    tv = sw["tv"].to_list()
    assert tv[0] > tv[1] > tv[2] and tv[2] < 0.02  # a hot softmax is SSP in disguise
    md = diagnostics_markdown(sw.row(2, named=True), sw, 100.0)
    assert "SSP in disguise" in md and md.count("\n|") == 5
    with pytest.raises(ValueError, match="expected temperatures > 0"):
        tau_sweep(cid, cos, cent, 200, taus=(0.0,))
    p = plot_keep_vs_complexity(np.arange(k, dtype=float), np.full(k, 100), np.full(k, 30), np.full(k, 33), tmp_path / "d.png")
    assert p.read_bytes()[:4] == b"\x89PNG"
