"""Timing and peak-memory helpers for the benchmarks.

Timings are reported as ratios within one run: these cores are shared, so an
absolute figure from one run says little, but methods measured round-robin in
the same run see the same noise. Peak memory on CPU is the process's resident
set sampled every millisecond while the method runs, minus what it was before
(torch's CPU allocator is invisible to tracemalloc); on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the next peak is measured from the floor.

    Without it, memory a method frees stays in the process and the next method's
    allocations reuse it without raising the resident set: its peak would read 0.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: peaks may then be underestimated
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Extra memory a block of code needs at its peak, in bytes (``.peak`` after the block)."""

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        _release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = resident_bytes()
            self._highest = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._highest = max(self._highest, resident_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self._highest, resident_bytes()) - self._base


@dataclass
class Measurement:
    name: str
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure_round_robin(
    methods: dict[str, Callable[[], object]],
    repeats: dict[str, int],
    device: torch.device,
    warmup: int = 1,
) -> dict[str, Measurement]:
    """Time every method ``repeats[name]`` times, interleaved, after ``warmup`` untimed calls; then its peak memory.

    Peak memory is taken in one more call of each method, apart from the timed ones:
    measuring it hands the free heap back to the OS first (:class:`PeakMemory`), which
    would make a timed call fault its memory in again, as no warm worker does. A method
    timed once (too slow to repeat, and so not warmed up either) is measured in that call.
    """
    results = {name: Measurement(name) for name in methods}
    for name, method in methods.items():
        for _ in range(warmup if repeats[name] > 1 else 0):
            method()
    for round_index in range(max(repeats.values())):
        for name, method in methods.items():
            if round_index >= repeats[name]:
                continue
            with PeakMemory(device) if repeats[name] == 1 else contextlib.nullcontext() as memory:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                method()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                results[name].seconds.append(time.perf_counter() - start)
            if memory is not None:
                results[name].peak_bytes = memory.peak
    for name, method in methods.items():
        if repeats[name] > 1:
            with PeakMemory(device) as peak:
                method()
            results[name].peak_bytes = peak.peak
    return results
