"""Explanation statistics kept as counters in the store: written by workers, exported by the API.

The workers are other processes (other machines, with Redis), so a Prometheus registry in
the API cannot see their jobs. Instead each finished job bumps a few integer counters in
the store (atomic ``INCRBY``, sent with the job's other bookkeeping through
:meth:`~classlens.core.store.Store.writes`), and the API's ``/metrics`` reads them at scrape time.
Counter names are derived from the catalog (models, their depth), so no key listing is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from classlens.core import keys
from classlens.core.store import Store, Writes

# Upper bounds (seconds) of the job-duration histogram; +Inf is implied.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATUSES = ("succeeded", "failed")
NEVER = "never"


def _bucket_name(bound: float) -> str:
    return "inf" if math.isinf(bound) else f"{bound:g}"


def jobs_key(kind: str, model: str, status: str) -> str:
    """The counter of ``model``'s finished jobs of ``kind`` that ended ``status``."""
    return f"{keys.STATS}jobs:{kind}:{model}:{status}"


def _duration_key(kind: str, model: str, bound: float) -> str:
    return f"{keys.STATS}duration:{kind}:{model}:{_bucket_name(bound)}"


def _duration_sum_key(kind: str, model: str) -> str:
    return f"{keys.STATS}duration_ms:{kind}:{model}"


def _emergence_key(model: str, layer: int | str) -> str:
    return f"{keys.STATS}emergence:{model}:{layer}"


def record_job(writes: Writes, *, kind: str, model: str, status: str, duration_s: float) -> None:
    """Count a finished job and its run time (cumulative histogram buckets, sum in milliseconds)."""
    writes.incr(jobs_key(kind, model, status))
    for bound in (*DURATION_BUCKETS, math.inf):
        if duration_s <= bound:
            writes.incr(_duration_key(kind, model, bound))
    writes.incr(_duration_sum_key(kind, model), round(duration_s * 1000))


def record_emergence(writes: Writes, *, model: str, layer: int | None) -> None:
    """Count the layer at which an explained class emerged (``never`` when it did not)."""
    writes.incr(_emergence_key(model, NEVER if layer is None else layer))


def _count(store: Store, key: str) -> int:
    value = store.get(key)
    return int(value) if value else 0


@dataclass(frozen=True)
class ModelStats:
    """One model version's figures, read back for export."""

    jobs: dict[tuple[str, str], int]  # (kind, status) -> count
    duration_buckets: dict[str, list[tuple[float, int]]]  # kind -> cumulative (bound, count), +Inf last
    duration_sum_s: dict[str, float]
    emergence: dict[str, int]  # "0".."L" or "never" -> count


def read_model_stats(store: Store, model: str, depth: int | None, kinds: Iterable[str]) -> ModelStats:
    """The counters of ``model`` (name@version); ``depth`` bounds the emergence layers read (None: 0..64)."""
    jobs: dict[tuple[str, str], int] = {}
    buckets: dict[str, list[tuple[float, int]]] = {}
    sums: dict[str, float] = {}
    for kind in kinds:
        for status in STATUSES:
            jobs[(kind, status)] = _count(store, jobs_key(kind, model, status))
        buckets[kind] = [
            (bound, _count(store, _duration_key(kind, model, bound))) for bound in (*DURATION_BUCKETS, math.inf)
        ]
        sums[kind] = _count(store, _duration_sum_key(kind, model)) / 1000
    layers = [str(layer) for layer in range((depth if depth is not None else 64) + 1)] + [NEVER]
    emergence = {layer: _count(store, _emergence_key(model, layer)) for layer in layers}
    return ModelStats(jobs, buckets, sums, {layer: n for layer, n in emergence.items() if n})
