"""The worker side of ClassLens: everything that needs torch and timm.

Importing this package prepares the process to run the lens:

- the torchvision compatibility step (:mod:`worker.torchvision_compat`), so that
  any ``import timm`` inside it works on CPU-only machines whose torchvision is a
  CUDA build;
- glibc's allocator keeps freed memory for reuse (:mod:`worker.allocator`), so that
  an explain request does not fault its large temporaries in again every time.

Only processes that run models import it (the API never does).
"""

from worker.allocator import keep_freed_memory as _keep_freed_memory
from worker.torchvision_compat import apply as _apply_torchvision_compat

_apply_torchvision_compat()
_keep_freed_memory()
