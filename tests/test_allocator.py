"""The worker's allocator setting: large temporaries are reused, not faulted in again on every call."""

import resource

import torch

from worker.allocator import keep_freed_memory

SIZE = 32 * 2**20 // 4  # 32 MB of float32: glibc's default would mmap it and unmap it on free
PAGES = 32 * 2**20 // resource.getpagesize()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_freed_large_tensors_are_mostly_reused_without_page_faults():
    assert keep_freed_memory()  # glibc here: the setting must take effect (worker/__init__ applies it)
    for _ in range(3):  # the heap settles within the first calls, as in a warm worker
        torch.ones(SIZE).sum()
    before = minor_faults()
    for _ in range(8):
        torch.ones(SIZE).sum()
    # Faulted in anew every time (glibc's defaults), 8 calls would cost 8 x PAGES faults. Reused, we
    # measured none on most runs and one call's worth on some (the heap is shared with pytest's own
    # allocations); at most a quarter of the calls may fault.
    assert minor_faults() - before < 2 * PAGES + 500
