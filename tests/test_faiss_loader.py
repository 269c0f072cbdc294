"""faiss is imported with its bundled OpenBLAS on the CPU's vector kernels (faiss_loader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curation.select.faiss_loader import cpu_flags, openblas_coretype

ROOT = Path(__file__).resolve().parents[1]
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_coretype_follows_the_vector_extensions():
    assert openblas_coretype(AVX512 | {"avx2", "fma", "sse3"}) == "SkylakeX"
    assert openblas_coretype({"avx2", "fma", "sse3"}) == "Haswell"
    # AVX-512 F alone (no BW/DQ/VL) is not what the SkylakeX kernels need
    assert openblas_coretype({"avx512f", "avx2", "fma"}) == "Haswell"
    assert openblas_coretype({"avx2"}) is None  # no FMA
    assert openblas_coretype({"sse3", "ssse3"}) is None
    assert openblas_coretype(set()) is None


def test_cpu_flags_reads_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel\t\t: 207\nflags\t\t: fpu sse3 avx2 fma avx512f\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == frozenset({"fpu", "sse3", "avx2", "fma", "avx512f"})
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def _faiss_core(extra_env: dict[str, str]) -> dict:
    """In a fresh process: import clustering (which imports faiss), report faiss's OpenBLAS core
    and what is left of OPENBLAS_CORETYPE."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env.update(extra_env)
    code = ("import json, os; import curation.select.clustering; "
            "from curation.select.faiss_loader import faiss_blas_core; "
            "print(json.dumps({'core': faiss_blas_core(), 'env': os.environ.get('OPENBLAS_CORETYPE')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_faiss_blas_runs_the_kernels_of_the_cpu_and_the_variable_is_not_left_set():
    want = openblas_coretype(cpu_flags())
    got = _faiss_core({})
    if want is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: OpenBLAS detects it itself")
    if got["core"] is None:
        pytest.skip("this faiss build does not carry an OpenBLAS of its own")
    # faiss-cpu 1.15.1's OpenBLAS 0.3.15 takes an Emerald Rapids (model 207) for 'Prescott' by itself
    assert got["core"].lower() == want.lower()
    assert got["env"] is None


def test_a_coretype_the_user_set_is_kept():
    got = _faiss_core({"OPENBLAS_CORETYPE": "Prescott"})
    if got["core"] is None:
        pytest.skip("this faiss build does not carry an OpenBLAS of its own")
    assert got["core"].lower() == "prescott" and got["env"] == "Prescott"


def test_an_empty_coretype_counts_as_unset_and_is_given_back():
    want = openblas_coretype(cpu_flags())
    got = _faiss_core({"OPENBLAS_CORETYPE": ""})
    assert got["env"] == ""
    if want is not None and got["core"] is not None:
        assert got["core"].lower() == want.lower()
