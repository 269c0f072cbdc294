"""Stable sample identifiers.

A sample's ``uid`` is a 128-bit id written as 32 lowercase hex characters, derived from
``(dataset, shard, key)`` so it is stable across re-runs and machines (DataComp uses
128-bit uids the same way). ``uids_to_u128`` turns them into a ``(n, 2) uint64`` array for
DataComp-style sorted ``.npy`` exports.
"""

from __future__ import annotations

import hashlib

import numpy as np


def make_uid(dataset: str, shard: str, key: str) -> str:
    """Return the 32-hex-character uid of sample ``key`` in ``shard`` of ``dataset``."""
    h = hashlib.blake2b(digest_size=16)
    for part in (dataset, shard, key):
        b = part.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def uids_to_u128(uids) -> np.ndarray:
    """Convert hex uids to a ``(n, 2) uint64`` array (high, low), DataComp's layout."""
    uids = list(uids)
    out = np.empty((len(uids), 2), dtype=np.uint64)
    for i, u in enumerate(uids):
        out[i, 0] = int(u[:16], 16)
        out[i, 1] = int(u[16:], 16)
    return out


def u128_to_uids(arr: np.ndarray) -> list[str]:
    """Inverse of :func:`uids_to_u128`."""
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in np.asarray(arr, dtype=np.uint64)]


def sorted_uid_array(uids) -> np.ndarray:
    """DataComp-style subset file content: uids as ``(n, 2) uint64`` sorted lexicographically."""
    arr = uids_to_u128(uids)
    if len(arr) == 0:
        return arr
    order = np.lexsort((arr[:, 1], arr[:, 0]))
    return arr[order]
