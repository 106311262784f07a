"""Claims on jobs that die with the worker holding them: why a killed worker costs seconds, not an hour.

A worker that runs a job (its own, or a companion of its batch) *claims* it first:
``claim:<job id>`` holds the claiming worker's id. Every worker process also beats its
own key, ``alive:<worker id>``, with a TTL of three heartbeat periods. So a claim is only
as good as its holder's heartbeat:

- a task whose job is claimed by a live worker returns at once (its message is
  acknowledged): the holder finishes the job, and no healthy worker waits on another's batch;
- a claim whose holder has no fresh heartbeat is *abandoned*: whoever finds it (a task for
  that job, the reaper that every worker runs, a submission that would join the job)
  drops it with a compare-and-delete, so exactly one of them acts, and the job is run again.

The reaper (:func:`reap`) is what makes a kill -9 of a whole worker cheap: the dead
worker's unacknowledged message would come back only after the broker's visibility
timeout (an hour on Redis) and the embedded broker forgets it, but its claims show
which jobs it held, and any live worker sends them again within a few heartbeats.
Work is idempotent (a job whose result exists is only marked succeeded), so the late
redelivery of the original message finds the job finished and does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from classlens.core import keys
from classlens.core.store import Store, StoreError

log = logging.getLogger(__name__)

CLAIM_PREFIX = keys.CLAIM
ALIVE_PREFIX = keys.ALIVE
# The holder named by the API's claim while it hands a job to the queue: never alive, so the worker that
# receives the message takes it over at once; others leave it alone for a while (see :func:`is_abandoned`).
HANDOVER_PREFIX = "api:"
HANDOVER_GRACE_S = 30.0
_CLAIM_TRIES = 8


def new_worker_id() -> str:
    """Unique per process and start: host and pid say where it ran, the suffix that it is not a reused pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# However short the heartbeat period, a worker is judged dead only after this long without a beat:
# on a loaded machine a busy process can miss a few short beats and still be alive.
ALIVE_MIN_S = 10.0


def beat_alive(store: Store, worker_id: str, period_s: float) -> None:
    """Say "this worker lives" for three periods, and at least :data:`ALIVE_MIN_S` (one missed beat is not death)."""
    store.set(ALIVE_PREFIX + worker_id, b"1", max(period_s * 3, ALIVE_MIN_S))


def is_alive(store: Store, worker_id: str) -> bool:
    return store.get(ALIVE_PREFIX + worker_id) is not None


def holder(store: Store, job_id: str) -> str | None:
    """The id of the worker that claims ``job_id``, or None."""
    value = store.get(CLAIM_PREFIX + job_id)
    return None if value is None else value.decode()


def handover_holder(taken_at: float | None = None) -> str:
    """The holder the API names while it queues a job: when it was taken (now by default), and a random suffix."""
    return f"{HANDOVER_PREFIX}{time.time() if taken_at is None else taken_at:.3f}:{uuid.uuid4().hex}"


def is_abandoned(store: Store, holder_id: str) -> bool:
    """Whether a claim held by ``holder_id`` has nobody behind it.

    A worker's claim is abandoned once its heartbeat lapses. The API's hand-over claim only once it
    is older than :data:`HANDOVER_GRACE_S`: a younger one is a job being queued right now (its
    message is on the way), and queueing it a second time would only make a duplicate.
    """
    if holder_id.startswith(HANDOVER_PREFIX):
        taken_at = holder_id[len(HANDOVER_PREFIX) :].split(":", 1)[0]
        try:
            return time.time() - float(taken_at) > HANDOVER_GRACE_S
        except ValueError:
            return True
    return not is_alive(store, holder_id)


def drop_if_abandoned(store: Store, job_id: str) -> bool:
    """Drop the claim on ``job_id`` when nobody is behind it (:func:`is_abandoned`); True when this call dropped it.

    Compare-and-delete: of several callers that find the same dead claim, exactly one gets True.
    """
    value = store.get(CLAIM_PREFIX + job_id)
    if value is None or not is_abandoned(store, value.decode()):
        return False
    return store.delete_if(CLAIM_PREFIX + job_id, value)


class Claims:
    """One worker's claims: taken, taken over from dead holders, released."""

    def __init__(self, store: Store, worker_id: str, *, lease_s: float):
        self.store = store
        self.worker_id = worker_id
        # An upper bound only (the hard time limit): a claim normally ends with its job or its holder.
        self.lease_s = lease_s
        # What this process believes it holds, and every job it claimed since a task's try began
        # (held or released since): handed back when a try is cut short by a store outage.
        self.held: set[str] = set()
        self.recent: set[str] = set()

    def claim(self, job_id: str) -> bool:
        """Take ``job_id`` for this worker; False only when a live worker (this one included) holds it.

        False must mean "someone alive runs it", since the caller then drops its message. So a claim
        that vanishes between the failed take and the look at its holder (the API's hand-over claim
        ends just as the message arrives) is taken again, not read as a live holder.
        """
        key, mine = CLAIM_PREFIX + job_id, self.worker_id.encode()
        for _ in range(_CLAIM_TRIES):
            if self.store.set_if_absent(key, mine, self.lease_s):
                self.held.add(job_id)
                self.recent.add(job_id)
                return True
            value = self.store.get(key)
            if value is None:
                continue  # released meanwhile: try again
            if is_alive(self.store, value.decode()):
                return False
            if self.store.delete_if(key, value) and not value.startswith(HANDOVER_PREFIX.encode()):
                log.warning("job %s was claimed by a worker that has no heartbeat; taking it over", job_id)
        # The claim changed hands every time we looked: some live process is busy with it.
        return False

    def release(self, job_ids: list[str]) -> None:
        """Drop this worker's claims on ``job_ids`` (a claim another worker took over stays)."""
        for job_id in job_ids:
            self.store.delete_if(CLAIM_PREFIX + job_id, self.worker_id.encode())
            self.held.discard(job_id)


def reap(store: Store, requeue: Callable[[str], None], lease_s: float = 60.0) -> list[str]:
    """Drop every abandoned claim and hand its job id to ``requeue``; the ids handed.

    A job ``requeue`` fails for (the broker is away) gets its dead claim back, so the next sweep tries again.
    """
    handed = []
    for key in store.keys(CLAIM_PREFIX):
        job_id = key[len(CLAIM_PREFIX) :]
        value = store.get(key)
        if value is None or not is_abandoned(store, value.decode()) or not store.delete_if(key, value):
            continue
        try:
            requeue(job_id)
        except Exception:
            store.set_if_absent(key, value, lease_s)
            raise
        handed.append(job_id)
    return handed


def start_liveness(
    store: Store, worker_id: str, period_s: float, requeue: Callable[[str], None] | None = None
) -> threading.Event:
    """Beat ``alive:<worker_id>`` every ``period_s`` in a daemon thread and, with ``requeue``, reap after each beat.

    A daemon thread of the process that claims, so that the beat stops exactly when that process
    dies (a prefork child's claims lapse with the child, not with its parent). Set the event to stop.
    """
    stop = threading.Event()

    def run() -> None:
        steady = 0  # beats in a row that reached the store
        while True:
            try:
                beat_alive(store, worker_id, period_s)
                steady += 1
                # Not right after the store came back: every live worker's key may have expired while it
                # was away, and must be beaten again (within one period) before its claims are judged.
                if requeue is not None and steady > 3:
                    for job_id in reap(store, requeue):
                        log.warning("job %s was claimed by a process that stopped beating; queued again", job_id)
            except StoreError:  # the store is away: beats resume with it, and claims wait for them
                steady = 0
            except Exception:  # never let the thread die: a worker without a beat would lose its claims
                with contextlib.suppress(Exception):
                    log.exception("liveness sweep failed")
            if stop.wait(period_s):
                return

    threading.Thread(target=run, name="classlens-liveness", daemon=True).start()
    return stop
