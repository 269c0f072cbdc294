"""SemDeDup's Gram triangle from numpy's own OpenBLAS ssyrk (native_blas): numpy's values, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation.select import native_blas
from curation.select.similarity import max_sim_to_earlier

ROOT = Path(__file__).resolve().parents[1]


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def native():
    if native_blas.numpy_openblas_path() is None:
        pytest.skip("numpy is not linked to a bundled OpenBLAS here")
    return native_blas


def test_the_native_routine_is_taken_where_numpy_bundles_openblas(native):
    # the pinned numpy wheel bundles scipy-openblas64: a fallback here would be a silent slowdown
    assert native.status() == os.path.basename(native.numpy_openblas_path())
    assert native.available()


def test_the_upper_triangle_is_numpys_x_xT_bit_for_bit(native):
    rng = np.random.default_rng(3)
    for n, d in [(2, 1), (3, 8), (17, 5), (256, 64), (300, 512)]:
        x = _unit(rng, n, d)
        assert np.array_equal(np.triu(native.ssyrk_upper(x)), np.triu(x @ x.T)), (n, d)
    assert native.ssyrk_upper(np.zeros((3, 0), np.float32)) is None  # no columns: numpy's zeros
    np.testing.assert_array_equal(max_sim_to_earlier(np.zeros((3, 0), np.float32)), [-1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="C-contiguous float32"):
        native.ssyrk_upper(_unit(rng, 4, 6)[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous float32"):
        native.ssyrk_upper(_unit(rng, 4, 6).astype(np.float64))


def _fallback(monkeypatch):
    monkeypatch.setitem(native_blas._STATE, "fn", None)
    monkeypatch.setitem(native_blas._STATE, "why", "test: numpy's product")


def test_semdedup_kernel_equals_numpys_product_path(native, monkeypatch):
    """Random sizes around the slab edge (256 rows), exact duplicates (ties), blocks below and
    above the size: the native kernel and numpy's ``x @ x.T`` path return the same M exactly."""
    rng = np.random.default_rng(11)
    cases = []
    for n in (2, 3, 255, 256, 257, 513, 700):
        x = _unit(rng, n, int(rng.integers(3, 90)))
        x[n // 2] = x[0]  # a duplicate: M = 1 exactly, and a tie with other rows
        cases += [(x, 2048), (x, max(1, n // 3))]
    native_m = [max_sim_to_earlier(x, block=b) for x, b in cases]
    _fallback(monkeypatch)
    for (x, b), m in zip(cases, native_m):
        assert np.array_equal(m, max_sim_to_earlier(x, block=b)), (x.shape, b)
        g = (x.astype(np.float64) @ x.astype(np.float64).T)
        dense = np.array([-1.0] + [g[j, :j].max() for j in range(1, len(x))])
        np.testing.assert_allclose(m, dense, atol=2e-6)


def test_a_library_that_disagrees_with_numpy_is_not_used(native, monkeypatch):
    real = native_blas._call

    def off_by_one_ulp(fn, x):
        c = real(fn, x)
        c[0, -1] = np.nextafter(c[0, -1], np.float32(2))
        return c

    monkeypatch.setattr(native_blas, "_call", off_by_one_ulp)
    fn, why = native_blas._load()
    assert fn is None and "differs from numpy" in why


def test_the_environment_switches_it_off():
    """In a fresh process with CURATION_NATIVE_SYRK=0: numpy's product, the same M."""
    code = ("import json, numpy as np; from curation.select import native_blas as nb; "
            "from curation.select.similarity import max_sim_to_earlier as m; "
            "x = np.eye(3, dtype=np.float32); x[2] = x[0]; "
            "print(json.dumps({'status': nb.status(), 'native': nb.available(), 'm': m(x).tolist()}))")
    env = dict(os.environ, CURATION_NATIVE_SYRK="0", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"status": "disabled by CURATION_NATIVE_SYRK=0", "native": False, "m": [-1.0, 0.0, 1.0]}


def test_direct_sgemm_follows_numpys_openblas_core(native, monkeypatch):
    """Pieces of the add-only update's products are cut only where numpy's OpenBLAS core has
    the direct small-matrix sgemm; the core is threadpoolctl's, and the environment overrides it."""
    from threadpoolctl import threadpool_info

    core = native.numpy_openblas_core()
    assert core == next(i["architecture"] for i in threadpool_info() if i["filepath"] == native.numpy_openblas_path())
    monkeypatch.delenv("CURATION_DIRECT_SGEMM", raising=False)
    assert native.direct_sgemm() == (core.lower() in native.DIRECT_SGEMM_CORES)
    for name, want in (("SkylakeX", True), ("SapphireRapids", True), ("Haswell", False), ("Zen", False)):
        monkeypatch.setitem(native_blas._STATE, "core", name)
        assert native.direct_sgemm() is want, name
        monkeypatch.setenv("CURATION_DIRECT_SGEMM", "0" if want else "1")
        assert native.direct_sgemm() is not want, name
        monkeypatch.delenv("CURATION_DIRECT_SGEMM")
    monkeypatch.setitem(native_blas._STATE, "core", None)  # another BLAS, or threadpoolctl failing
    assert native.direct_sgemm() is False
