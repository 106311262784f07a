"""Make timm importable where torchvision's compiled operators do not load.

Why this exists: timm imports torchvision at import time. On CPU-only machines the
only torchvision that matches torch 2.13.0 on the registry is a CUDA build
(0.28.0). Its pure-Python parts work, but its import registers fake (meta)
kernels for two operators, ``torchvision::nms`` and ``torchvision::qnms``, whose
schemas come from the compiled library that failed to load, so the import raises
``RuntimeError: operator torchvision::nms does not exist`` (see ENVIRONMENT.md).

:func:`apply` imports torchvision; only if that fails in exactly this way does it
define those two schemas with :mod:`torch.library` (schemas only, no kernels:
ClassLens never calls NMS) and import again. Where torch and torchvision match
(GPU images, a CPU torchvision build) the first import succeeds and nothing is
changed. Call it before the first ``import timm``; it is idempotent.
"""

from __future__ import annotations

import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Kept alive for the process: a torch.library.Library drops its definitions when
# it is garbage collected.
_library: torch.library.Library | None = None


def _operator_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _forget_torchvision() -> None:
    """Drop a half-imported torchvision so that the next import starts afresh."""
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module]


def apply() -> list[str]:
    """Import torchvision, defining its missing operator schemas if that is needed.

    Returns the operator names this call defined (empty where none were needed).
    Raises the original error for any other import failure.
    """
    global _library
    try:
        import torchvision

        return []
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    _forget_torchvision()
    missing = [name for name in _SCHEMAS if not _operator_exists(name)]
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])
    import torchvision  # noqa: F401

    return missing
