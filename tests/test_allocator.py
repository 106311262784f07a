"""The worker's allocator setting: large temporaries are reused, not faulted in again."""

import resource

import torch

from worker.allocator import keep_freed_memory


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_a_freed_large_tensor_is_reused_without_page_faults_once_warm():
    assert keep_freed_memory()  # glibc here: the setting must take effect (worker/__init__ applies it)
    size = 32 * 2**20 // 4  # 32 MB of float32: above glibc's default mmap threshold range
    for _ in range(3):  # allocated, touched, freed: the heap settles within the first calls, as in a warm worker
        torch.ones(size).sum()
    before = minor_faults()
    torch.ones(size).sum()
    # 32 MB faulted in anew would be 8,192 faults of 4 kB pages; reused, (almost) none.
    assert minor_faults() - before < 500
