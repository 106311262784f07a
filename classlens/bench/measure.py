"""Timing and peak-memory helpers for the benchmarks.

These cores are shared, so a time from one run says little, and a wall-clock ratio swings
with whatever else runs. A figure is therefore a ratio of *process CPU time* (what the work
costs, however long it waited for a core) at a fixed torch thread count, taken within one
round in which the methods ran back to back (:func:`measure_rounds`), and reported as min /
median / max over the rounds (:func:`summarise`) with the machine's load in each round: the
load average, and the share of the CPUs other processes took during the round. A round in
which others took more than :data:`LOADED_SHARE` is flagged as loaded. Wall-clock ratios are
reported beside, never instead. On CUDA the ratio is of synchronised wall time.

Peak memory on CPU is the process's resident set sampled every millisecond while the method
runs, minus what it was before (torch's CPU allocator is invisible to tracemalloc); on CUDA it
is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


LOADED_SHARE = 0.25  # a round is "loaded" when other processes used over a quarter of the machine's CPUs


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has been given since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest and guest_nice are already counted in user and nice.
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Round:
    """One pass over the methods at one thread count: each method's process CPU time and wall time.

    ``others_share``: the CPU time other processes took during the round, as a share of all the
    machine's CPUs over the round's wall time. It is read from ``/proc/stat`` at the round's ends,
    so unlike the load average (a one-minute mean) it is about this round only.
    """

    threads: int
    order: tuple[str, ...]
    cpu_s: dict[str, float]
    wall_s: dict[str, float]
    load_average: float
    others_share: float
    calls: int = 1  # calls of each method in the round (the methods in turn), the reading being their mean

    @property
    def loaded(self) -> bool:
        return self.others_share > LOADED_SHARE


def _timed(method: Callable[[], object], device: torch.device, calls: int = 1) -> tuple[float, float]:
    """CPU and wall seconds of one call of ``method``, the mean of ``calls`` calls in a row."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        method()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def calls_per_reading(method: Callable[[], object], device: torch.device, threads: int, at_least_s: float = 0.2) -> int:
    """How many calls of ``method`` in a row, at ``threads`` torch threads, make a reading last ``at_least_s``.

    One call of a small model's forward pass takes a few milliseconds, shorter than the
    scheduler's time slice on shared cores, so a single call's CPU time swings several-fold with
    whatever else ran on the core; the mean of enough calls in a row does not. 1 for a slow method.
    """
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        method()  # warm
        seconds, _ = _timed(method, device, 3)
    finally:
        torch.set_num_threads(before)
    return max(1, min(1000, round(at_least_s / max(seconds, 1e-6))))


def measure_rounds(
    methods: Mapping[int, Mapping[str, Callable[[], object]]],
    rounds: int,
    device: torch.device,
    repeats: Mapping[str, int] | None = None,
    warmup: int = 1,
    calls: int = 1,
) -> list[Round]:
    """Time every method in ``rounds`` rounds per thread count, interleaved, in rotating order.

    ``methods`` maps a torch thread count to the methods to time at it (a method may need to be
    built per thread count, as an onnxruntime session is). Rounds alternate between the thread
    counts, and each round starts one method later than the one before, so that every method,
    at every thread count, meets the machine's changing load in every position; a ratio is then
    taken within a round (:func:`summarise`). A method timed in fewer rounds (``repeats``, for
    the slow ones) sits out the rest. Time is the process's CPU time (all its threads: what the
    work costs, whatever else the machine runs) beside wall-clock time. Each method's reading in a
    round is the mean of ``calls`` calls (:func:`calls_per_reading`), the methods called in turn,
    one call each, so that the machine's speed changing during the round changes them all alike.
    """
    repeats = repeats or {}
    before = torch.get_num_threads()
    try:
        for threads, chosen in methods.items():
            torch.set_num_threads(threads)
            for name, method in chosen.items():
                for _ in range(warmup if repeats.get(name, rounds) > 1 else 0):
                    method()
        readings = []
        for index in range(rounds):
            for threads, chosen in methods.items():
                torch.set_num_threads(threads)
                names = [name for name in chosen if index < repeats.get(name, rounds)]
                shift = index % len(names)
                order = tuple(names[shift:] + names[:shift])
                busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
                cpu_s, wall_s = dict.fromkeys(order, 0.0), dict.fromkeys(order, 0.0)
                for _ in range(calls):  # call by call in turn: a drift in the machine's speed meets every method
                    for name in order:
                        cpu, wall = _timed(chosen[name], device)
                        cpu_s[name] += cpu / calls
                        wall_s[name] += wall / calls
                wall = time.perf_counter() - start
                others = (busy_cpu_seconds() - busy) - (time.process_time() - own)
                share = max(0.0, others) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
                readings.append(Round(threads, order, cpu_s, wall_s, os.getloadavg()[0], round(share, 3), calls))
        return readings
    finally:
        torch.set_num_threads(before)


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def summarise(readings: Sequence[Round], reference: str, device: torch.device) -> dict[str, dict[str, Any]]:
    """Per method and thread count: the ratio to ``reference`` within each round, as min / median / max.

    The ratio is of process CPU time on the CPU (of wall time on CUDA, where the work is not the
    process's CPU time). ``quiet`` gives the same spread over the rounds that were not loaded
    (null when every round was); ``loaded_rounds`` says how many were.
    """
    primary = "wall_s" if device.type == "cuda" else "cpu_s"
    figures: dict[str, dict[str, Any]] = {}
    for threads in sorted({reading.threads for reading in readings}):
        at = [reading for reading in readings if reading.threads == threads]
        for name in dict.fromkeys(name for reading in at for name in reading.order):
            ran = [reading for reading in at if name in reading.cpu_s]
            ratios = [getattr(r, primary)[name] / getattr(r, primary)[reference] for r in ran]
            quiet = [ratio for ratio, r in zip(ratios, ran, strict=True) if not r.loaded]
            figures.setdefault(name, {})[str(threads)] = {
                "ratio": spread(ratios),
                "quiet_ratio": spread(quiet) if quiet else None,
                "wall_ratio": spread([r.wall_s[name] / r.wall_s[reference] for r in ran]),
                "cpu_ms": round(statistics.median(r.cpu_s[name] for r in ran) * 1000, 2),
                "wall_ms": round(statistics.median(r.wall_s[name] for r in ran) * 1000, 2),
                "rounds": len(ran),
                "loaded_rounds": sum(1 for r in ran if r.loaded),
            }
    return figures


def figure_cells(at: Mapping[str, Any]) -> str:
    """A figure of :func:`summarise` as table cells: ratio median [min-max], wall ratio, loaded/rounds."""
    ratio = at["ratio"]
    return (
        f"{ratio['median']:>8.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]  "
        f"{at['wall_ratio']['median']:>7.2f} {at['loaded_rounds']:>3}/{at['rounds']:<3}"
    )


def round_records(readings: Sequence[Round]) -> list[dict[str, Any]]:
    """What each round saw of the machine, for the JSON record."""
    return [
        {
            "threads": r.threads,
            "order": list(r.order),
            "load_average": round(r.load_average, 2),
            "others_share": r.others_share,
            "loaded": r.loaded,
            "calls": r.calls,
        }
        for r in readings
    ]


def peak_memory(methods: Mapping[str, Callable[[], object]], device: torch.device) -> dict[str, int]:
    """Extra bytes each method needs at its peak, one call each, apart from the timed ones.

    Measuring a peak hands the free heap back to the OS first (:class:`PeakMemory`), which would
    make a timed call fault its memory in again, as no warm worker does.
    """
    peaks = {}
    for name, method in methods.items():
        with PeakMemory(device) as memory:
            method()
        peaks[name] = memory.peak
    return peaks
