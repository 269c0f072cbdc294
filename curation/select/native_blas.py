"""numpy's own OpenBLAS ``cblas_ssyrk``, called directly: a Gram matrix's upper triangle only.

SemDeDup's kernel (:func:`curation.select.similarity.max_sim_to_earlier`) needs, per cluster,
the inner products of every member with every EARLIER member: one triangle of ``x @ x.T``.
numpy computes ``x @ x.T`` with BLAS ``ssyrk`` (one triangle) and then copies that triangle
into the other one, element by element with a strided write: for a 1,000 x 512 cluster that
copy is ~15% of the product's time, for values the kernel masks away. This module calls the
same ``cblas_ssyrk`` of the same library numpy loaded, with the same arguments numpy passes,
and skips the copy, so the triangle it returns is bit-for-bit the one ``x @ x.T`` holds.

Measured (docs/benchmarks.md, session 9; 1,000-row clusters, one BLAS thread): the kernel
takes 0.77-0.84x the time of the numpy one in every one of 5 interleaved rounds, with equal
output. The call goes through ``ctypes.CDLL``, which releases the GIL (SemDeDup's bucket
threads multiply in parallel: 2.06x on two threads; ``scipy.linalg.blas.ssyrk`` holds the
GIL and ran 0.94x), and it runs on numpy's BLAS thread pool, so ``threadpoolctl`` limits
(:func:`curation.select.similarity.single_thread_blas`) apply to it.

:func:`ssyrk_upper` returns None when the routine is not available (numpy built against
another BLAS: Accelerate, MKL, a 32-bit-integer OpenBLAS), when its first result is not
bit-for-bit numpy's, or when ``CURATION_NATIVE_SYRK=0``: callers then use ``x @ x.T``.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

#: ILP64 symbol names of numpy's bundled OpenBLAS (``scipy-openblas64``) and of a plain ILP64 build
SYMBOLS = ("scipy_cblas_ssyrk64_", "cblas_ssyrk64_")
_ROW_MAJOR, _UPPER, _NO_TRANS = 101, 121, 111  # CBLAS enum values
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def bundled_openblas(package: str) -> list[dict]:
    """threadpoolctl's entries for the OpenBLAS copies loaded from a wheel's own library
    directory (``numpy.libs``, ``faiss_cpu.libs``: a directory whose name starts with ``package``)."""
    from threadpoolctl import threadpool_info

    return [info for info in threadpool_info() if info.get("internal_api") == "openblas"
            and os.path.basename(os.path.dirname(info.get("filepath") or "")).startswith(package)]


def numpy_openblas_path() -> str | None:
    """The file of the OpenBLAS numpy loaded (None: numpy uses another BLAS)."""
    numpy_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    for info in bundled_openblas("numpy"):
        if os.path.abspath(info["filepath"]).startswith(numpy_dir):
            return info["filepath"]
    return None


def _bind(path: str):
    lib = ctypes.CDLL(path)  # the library numpy already loaded: the same handle, no second copy
    for name in SYMBOLS:
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        i64 = ctypes.c_int64
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, ctypes.c_float, ctypes.c_void_p, i64,
                       ctypes.c_float, ctypes.c_void_p, i64]
        fn.restype = None
        return fn
    return None


def _call(fn, x: np.ndarray) -> np.ndarray:
    n, k = x.shape
    c = np.empty((n, n), np.float32)
    # numpy's own call for x @ x.T of a C-contiguous float32 x (row major, upper, no transpose)
    fn(_ROW_MAJOR, _UPPER, _NO_TRANS, n, k, 1.0, x.ctypes.data, k, 0.0, c.ctypes.data, n)
    return c


def _load():
    if os.environ.get("CURATION_NATIVE_SYRK", "1").strip() == "0":
        return None, "disabled by CURATION_NATIVE_SYRK=0"
    try:
        path = numpy_openblas_path()
    except Exception as e:  # threadpoolctl missing or failing: numpy's product
        return None, f"threadpoolctl: {e}"
    if path is None:
        return None, "numpy is not linked to a bundled OpenBLAS"
    fn = _bind(path)
    if fn is None:
        return None, f"{os.path.basename(path)} exports none of {SYMBOLS}"
    # the first call checks itself against numpy on rows of every shape class it will see
    rng = np.random.default_rng(0)
    for n in (2, 7, 129, 300):  # (one row: numpy takes a dot product, not ssyrk)
        x = rng.standard_normal((n, 37)).astype(np.float32)
        if not np.array_equal(np.triu(_call(fn, x)), np.triu(x @ x.T)):
            return None, f"{os.path.basename(path)}: ssyrk differs from numpy's x @ x.T"
    return fn, os.path.basename(path)


#: OpenBLAS cores (threadpoolctl's ``architecture``, lower case) whose ``sgemm`` multiplies a small
#: product straight from its operands, without packing them first ("direct sgemm",
#: ``kernel/x86_64/sgemm_direct_skylakex.c``, built for these three): the add-only SemDeDup
#: update cuts its products to that size there (:func:`curation.select.layout.piece_rows`)
DIRECT_SGEMM_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def numpy_openblas_core() -> str | None:
    """The kernels numpy's OpenBLAS picked for this CPU (threadpoolctl's ``architecture``,
    e.g. ``Haswell``, ``SkylakeX``), or None when numpy uses another BLAS or threadpoolctl
    cannot tell."""
    if "core" in _STATE:  # read once per process (piece_rows asks once per touched cluster)
        return _STATE["core"]
    with _LOCK:
        if "core" not in _STATE:
            try:
                path = numpy_openblas_path()
                core = next((i.get("architecture") for i in bundled_openblas("numpy") if i["filepath"] == path), None)
            except Exception:  # threadpoolctl missing or failing
                core = None
            _STATE["core"] = core
    return _STATE["core"]


def direct_sgemm() -> bool:
    """True when numpy's OpenBLAS runs a core of :data:`DIRECT_SGEMM_CORES` (small products
    skip the packing copy), unless ``CURATION_DIRECT_SGEMM`` says otherwise (``1``/``0``)."""
    forced = os.environ.get("CURATION_DIRECT_SGEMM", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    core = numpy_openblas_core()
    return core is not None and core.lower() in DIRECT_SGEMM_CORES


def available() -> bool:
    """True when :func:`ssyrk_upper` runs the native routine (False: callers use ``x @ x.T``)."""
    return _fn() is not None


def status() -> str:
    """What :func:`ssyrk_upper` runs: the library's file name, or why it falls back."""
    _fn()
    return str(_STATE["why"])


def _fn():
    with _LOCK:
        if "fn" not in _STATE:
            _STATE["fn"], _STATE["why"] = _load()
    return _STATE["fn"]


def ssyrk_upper(x: np.ndarray) -> np.ndarray | None:
    """``(n, n)`` float32 whose upper triangle (diagonal included) is ``x @ x.T``'s, bit for
    bit for n >= 2; the strict lower triangle is left unwritten (arbitrary values). ``x``: ``(n, k)``
    float32, C-contiguous. None when the native routine is not available (see the module)."""
    fn = _fn()
    if fn is None or x.ndim != 2 or x.shape[1] == 0:  # no columns: BLAS rejects lda = 0; x @ x.T is zeros
        return None
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"ssyrk_upper: got {x.dtype} {'C' if x.flags.c_contiguous else 'non-C'}-ordered rows; "
                         "expected C-contiguous float32")
    return _call(fn, x)
