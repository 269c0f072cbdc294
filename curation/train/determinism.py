"""Deterministic training and evaluation on one machine: the settings and their record.

Two runs of the same config and seed give bit-identical weights on the same machine only
when every source of variation is pinned (see docs/evidence.md for what was measured):

* the intra-op thread count: a CPU reduction (matmul, conv, sum) splits its work by thread,
  so a different count adds the same numbers in a different order and the float result
  differs in the last bits, which training amplifies. torch's default is "every core", so a
  run on a box with another free-core count (or another ``OMP_NUM_THREADS``) differs.
  :func:`set_deterministic` pins it to ``CURATION_TORCH_THREADS`` (``curation demo`` sets 2
  when unset; without the variable the current count is kept, e.g. a test's one thread) and
  :func:`determinism_record` writes it beside every checkpoint.
* nondeterministic kernels (CUDA atomics, cuDNN autotuning):
  ``torch.use_deterministic_algorithms(True, warn_only=True)``, ``cudnn.benchmark = False``,
  ``cudnn.deterministic = True`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``.
* randomness: model init from ``torch.manual_seed(seed)``, data order and augmentations from
  an explicit ``torch.Generator`` (curation.train.trainer); numpy generators are always
  seeded (``np.random.default_rng(seed)``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

THREADS_ENV = "CURATION_TORCH_THREADS"
DEFAULT_THREADS = 2


def default_threads() -> int | None:
    """``$CURATION_TORCH_THREADS`` as an int, or None when unset (keep the current count)."""
    v = os.environ.get(THREADS_ENV)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV}: got {v!r}; expected an integer >= 1")
    return n


def set_deterministic(threads: int | None = None) -> dict:
    """Pin torch to deterministic kernels and a fixed intra-op thread count.

    Args:
        threads: intra-op threads (default :func:`default_threads`; None keeps the current count).

    Returns:
        :func:`determinism_record` after the change.
    """
    import torch

    n = default_threads() if threads is None else int(threads)
    if n is not None and n < 1:
        raise ValueError(f"threads: got {n}; expected >= 1")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return determinism_record()


def determinism_record() -> dict:
    """What decides bit-reproducibility, to store with a result: threads, flags, versions."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "torch_deterministic": bool(torch.are_deterministic_algorithms_enabled()),
        "torch_version": torch.__version__,
        "device_count_cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


__all__ = ["DEFAULT_THREADS", "THREADS_ENV", "default_threads", "determinism_record", "set_deterministic"]
