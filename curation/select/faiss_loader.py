"""Import faiss with its bundled OpenBLAS on the CPU's vector kernels.

The ``faiss-cpu`` wheel (1.15.1) carries its own OpenBLAS (0.3.15), which picks its kernels
from the CPU model at load time. A CPU newer than that OpenBLAS (Intel Emerald Rapids, model
207, the 2026-12-06 benchmark box) is not in its table, and it falls back to the generic
``Prescott`` (SSE3) kernels: faiss's k-means and flat search then run 4-6x slower than on
AVX-512 kernels (docs/benchmarks.md, session 8: five k-means iterations of 256,000 x 512 rows
into 1,000 centroids 30-43 s vs 7-9 s; the 1M pool benchmark's k-means 89.1 -> 19.4 s and its
layout stage 46.0 -> 16.1 s, medians of 3). numpy's own OpenBLAS (newer) is not affected.

:func:`import_faiss` imports faiss with ``OPENBLAS_CORETYPE`` set from the CPU's flags
(``SkylakeX`` for AVX-512 F/CD/BW/DQ/VL, ``Haswell`` for AVX2 + FMA) for the duration of the
import only: faiss's OpenBLAS reads it once, when it is loaded, and the variable is then put
back as it was, so numpy (loaded before) and child processes keep their own detection. A value
the user set is left as it is (``OPENBLAS_CORETYPE=Prescott`` reproduces the slow path). Other
platforms (no ``/proc/cpuinfo``, not x86) import faiss unchanged.
"""

from __future__ import annotations

import os
import sys

import numpy  # noqa: F401 - numpy's own BLAS is loaded (and detects the CPU itself) before the override

_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
_AVX2 = frozenset({"avx2", "fma"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's ``flags`` in ``path`` (empty when unreadable or absent)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def openblas_coretype(flags) -> str | None:
    """The OpenBLAS core whose kernels these CPU ``flags`` run: ``SkylakeX`` (AVX-512),
    ``Haswell`` (AVX2 + FMA), or None (let OpenBLAS detect: older x86 or another ISA)."""
    flags = frozenset(flags)
    if _AVX512 <= flags:
        return "SkylakeX"
    if _AVX2 <= flags:
        return "Haswell"
    return None


def import_faiss():
    """``import faiss`` with :data:`OPENBLAS_CORETYPE` set for the import (see the module
    docstring); the module when it is imported already."""
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    before = os.environ.get("OPENBLAS_CORETYPE")
    core = None if before else openblas_coretype(cpu_flags())
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        if core is not None:  # as it was: unset, or the empty value the user gave
            if before is None:
                os.environ.pop("OPENBLAS_CORETYPE", None)
            else:
                os.environ["OPENBLAS_CORETYPE"] = before
    return faiss


def faiss_blas_core() -> str | None:
    """The kernels (``architecture``) of the OpenBLAS that faiss loaded, as threadpoolctl
    reports them, or None (faiss not imported, or its BLAS is not an OpenBLAS of its own)."""
    if "faiss" not in sys.modules:
        return None
    try:
        from curation.select.native_blas import bundled_openblas

        found = bundled_openblas("faiss")
    except ImportError:  # pragma: no cover - the pinned environment has threadpoolctl
        return None
    return found[0].get("architecture") if found else None
