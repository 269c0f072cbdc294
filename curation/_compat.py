"""Import-time compatibility for PyPI's CUDA-linked torchvision on a CPU-only torch.

PyPI's ``torchvision==0.28.0`` wheel is linked against CUDA; with the CPU build of
``torch==2.13.0`` its compiled ops library does not load, and ``import torchvision``
(and so ``open_clip``, ``timm``) fails with ``operator torchvision::nms does not exist``
because ``torchvision/_meta_registrations.py`` registers fake kernels for ``nms`` and
``qnms`` unconditionally. :func:`ensure_torchvision` declares the two missing operator
schemas with :mod:`torch.library` *only when the normal import fails*, after which the
transforms and models import and work. The detection ops themselves stay unavailable
(calling ``torchvision.ops.nms`` raises), which this project never uses; images are
decoded with Pillow, not ``torchvision.io``.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # keep the torch.library.Library alive for the life of the process


def _purge_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision():
    """Import torchvision, declaring missing op schemas first if the plain import fails.

    Returns:
        The imported ``torchvision`` module.
    """
    global _LIBRARY
    try:
        import torchvision  # noqa: F401

        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        log.debug("torchvision ops library unavailable (%s); declaring op schemas", err)
    _purge_partial_import()
    import torch

    if _LIBRARY is None:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op, schema in _SCHEMAS.items():
            try:
                lib.define(schema)
            except RuntimeError:  # already defined by someone else
                pass
        _LIBRARY = lib
    import torchvision

    return torchvision


ensure_torchvision()
