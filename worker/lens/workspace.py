"""What the explain calls of one loaded model reuse: the large output buffers and the projections.

An explanation writes two tensors of tens of megabytes: the traced streams ``x_b``, ``a_b``,
``m_b`` (``[B, S, T, D]``: 21 MiB for one 224x224 image on ViT-B/16) and the logits of every
stream (``[B, S, T, C]``: 28 MiB with 1,000 classes). A plain
forward pass allocates nothing that large, so glibc's allocator serves its blocks from the heap;
blocks this size it ``mmap``-s and returns to the kernel on free, or trims off the heap's top,
and then every call faults its pages in again and the kernel zeroes each one. Keeping those
buffers with the loaded model, and writing into them (``out=``, ``copy_``, in-place ops), leaves
the allocator's defaults alone: no process-wide setting, and a process that drops the model
drops the memory with it.

The bound: a workspace holds at most ``max_bytes`` (:data:`DEFAULT_MAX_BYTES`). Each buffer
is a flat block of bytes grown to the largest request that fitted; a request whose buffers
would take the workspace past the bound (a batch larger than the usual) gets buffers of its
own, freed when it ends, and the workspace keeps what it held. :meth:`Workspace.clear` frees
everything.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

# Enough for the streams and logits of a batch of 8 images (a worker's default batch of explain
# jobs) on a 1,000-class ViT-B/16 at 224x224: 392 MiB, 49 MiB for one image.
DEFAULT_MAX_BYTES = 512 * 2**20


class Workspace:
    """Buffers keyed by name, and objects built once per key (the projections), for one loaded model.

    Thread-safe by leasing: the explain of a worker process runs on one thread, which takes
    the whole workspace for the length of a call (:meth:`lease`). A second thread arriving
    meanwhile (an embedded worker serving two jobs, a test) never waits and never shares a
    buffer: it is told that the workspace is busy and allocates its own, as if there were none.
    So a buffer handed out is written by one call at a time, and its contents are only valid
    until the lease ends.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._blocks: dict[str, torch.Tensor] = {}
        self._built: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[Workspace | None]:
        """This workspace for one call, or None while another thread holds it (then allocate as usual)."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self
        finally:
            self._lock.release()

    @property
    def bytes_held(self) -> int:
        return sum(block.numel() for block in self._blocks.values())

    def empty(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` whose contents are undefined: ``name``'s buffer, or one of its own.

        Two buffers of one call need two names: asking for a name again hands out the same memory.
        """
        size = math.prod(shape) * dtype.itemsize
        block = self._blocks.get(name)
        if block is None or block.device != device or block.numel() < size:
            others = self.bytes_held - (0 if block is None else block.numel())
            if others + size > self.max_bytes:
                return torch.empty(tuple(shape), dtype=dtype, device=device)
            self._blocks.pop(name, None)  # freed before its larger successor is allocated
            block = torch.empty(size, dtype=torch.uint8, device=device)
            self._blocks[name] = block
        return block[:size].view(dtype).view(tuple(shape))

    def built(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, the same object afterwards."""
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def clear(self) -> None:
        """Free every buffer and forget what was built."""
        self._blocks.clear()
        self._built.clear()


def empty(
    workspace: Workspace | None, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """:meth:`Workspace.empty`, or a tensor of its own without a workspace."""
    if workspace is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return workspace.empty(name, shape, dtype, device)
