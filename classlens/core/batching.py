"""Cross-request batching of explain jobs: which queued jobs one forward pass may serve.

Jobs for the same model with the same canonical parameters can share a pass: the lens
explains a batch of images under one request. The API *offers* each new explain job on a
list named after that pair (:func:`batch_key`); the worker that starts a job *claims* it,
then takes up to ``batch_max - 1`` companions off the list and claims each. A claim is
:class:`classlens.core.leases.Claims`'s ``claim:<job id>``, naming the claiming worker, so:

- Late acknowledgement is untouched: every job keeps its own Celery message, acknowledged
  only after its own task returns. A companion's message, delivered later, finds its job
  finished, or claimed by a live worker, and returns at once (it never waits on another batch).
- Nothing accepted is lost when a worker dies mid-batch: its claims are abandoned as soon as
  its heartbeat lapses, and the reaper of any live worker queues their jobs again.

Why not celery-batches: it buffers messages inside one consumer (with a prefetch as large
as the batch) and acknowledges them as a group; keeping prefetch 1 and one late ack per
message, and forming batches from the store, keeps every guarantee the service has without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from classlens.core import keys
from classlens.core.contract import Job
from classlens.core.jobs import canonical_json, sha256_hex
from classlens.core.leases import Claims
from classlens.core.store import Store


def batch_key(model: str, parameters: dict[str, object]) -> str:
    """The list of jobs that can share a forward pass: same resolved model, same canonical parameters."""
    return keys.BATCH + sha256_hex(canonical_json({"model": model, "parameters": parameters}).encode())


def offer(store: Store, job: Job, ttl_s: float) -> None:
    """The API side: make a queued job visible to workers forming a batch (after it is enqueued)."""
    key = batch_key(job.model, job.parameters)
    store.push(key, job.id.encode(), ttl_s)
    store.notify(key)


class BatchQueue:
    """The worker side: companions taken off the offer lists, and claims, in the service's store."""

    def __init__(self, store: Store, *, lease_s: float, worker_id: str):
        self.store = store
        self.claims = Claims(store, worker_id, lease_s=lease_s)

    def claim(self, job_id: str) -> bool:
        """Take the job into this worker's batch; False when a live worker (this one included) holds it."""
        return self.claims.claim(job_id)

    def release(self, job_ids: list[str]) -> None:
        self.claims.release(job_ids)

    def companions(self, job: Job, count: int, wait_s: float, usable: Callable[[str], Job | None]) -> list[Job]:
        """Up to ``count`` other offered jobs of ``job``'s batch, claimed for the caller.

        ``usable`` says whether a popped id still needs work (a job that ran on its own, or
        whose result another job stored meanwhile, does not). Waits at most ``wait_s`` for
        the batch to fill; returns at once when it is full.
        """
        key = batch_key(job.model, job.parameters)
        taken: list[Job] = []
        self._take(key, job, count, usable, taken)
        if len(taken) == count or wait_s <= 0:
            return taken  # no subscription when there is nothing to wait for
        deadline = time.monotonic() + wait_s
        with self.store.listen(key) as offers:
            while len(taken) < count and (remaining := deadline - time.monotonic()) > 0:
                offers.wait(remaining)
                self._take(key, job, count, usable, taken)
        return taken

    def _take(self, key: str, job: Job, count: int, usable: Callable[[str], Job | None], taken: list[Job]) -> None:
        """Pop offered ids until ``taken`` holds ``count`` jobs or the list is empty."""
        while len(taken) < count:
            # Exactly as many as are missing: an id popped is taken or dropped, never put back.
            # (A dropped one still has its own message; it only misses this batch.)
            popped = self.store.pop(key, count - len(taken))
            if not popped:
                return
            for raw in popped:
                job_id = raw.decode()
                if job_id == job.id:
                    continue
                other = usable(job_id)
                if other is not None and other.parameters == job.parameters and self.claim(job_id):
                    taken.append(other)
