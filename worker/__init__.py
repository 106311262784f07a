"""The worker side of ClassLens: everything that needs torch and timm.

Importing this package applies the torchvision compatibility step first
(:mod:`classlens.torchvision_compat`), so that any ``import timm`` inside it works
on CPU-only machines whose torchvision is a CUDA build.
"""

from classlens.torchvision_compat import apply as _apply_torchvision_compat

_apply_torchvision_compat()
