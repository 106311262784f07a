"""The worker side of ClassLens: everything that needs torch and timm.

Importing this package applies the torchvision compatibility step
(:mod:`worker.torchvision_compat`), so that any ``import timm`` inside it works on
CPU-only machines whose torchvision is a CUDA build. The C library's allocator is
left as it comes: an explanation reuses its large buffers itself, through the
loaded model's workspace (:mod:`worker.lens.workspace`).

Only processes that run models import it (the API never does).
"""

from worker.torchvision_compat import apply as _apply_torchvision_compat

_apply_torchvision_compat()
