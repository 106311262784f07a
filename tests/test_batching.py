"""Cross-request batching, its own logic against a real store: offers, claims, companions."""

from __future__ import annotations

import threading
import time

import pytest

from classlens.core import batching, leases
from classlens.core.batching import BatchQueue, batch_key
from classlens.core.contract import Job
from classlens.core.jobs import new_job_id
from classlens.core.leases import beat_alive, new_worker_id
from classlens.core.store import RedisStore, SqliteStore


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path):
    if request.param == "redis":
        return RedisStore(request.getfixturevalue("redis_url"))
    return SqliteStore(tmp_path / "store.sqlite3")


def job(model: str = "m@1", **parameters: object) -> Job:
    now = time.time()
    return Job(
        id=new_job_id(),
        kind="explanation",
        status="queued",
        created_at=now,
        updated_at=now,
        model=model,
        parameters=parameters or {"top_k": 3},
        content_key=new_job_id(),
    )


def live_queue(store) -> BatchQueue:
    """A worker's batch queue whose heartbeat is fresh (a claim by a dead worker is taken over)."""
    worker_id = new_worker_id()
    beat_alive(store, worker_id, 60)
    return BatchQueue(store, lease_s=60, worker_id=worker_id)


def test_batch_key_separates_models_and_parameters():
    assert batch_key("m@1", {"top_k": 3}) == batch_key("m@1", {"top_k": 3})
    assert batch_key("m@1", {"top_k": 3}) != batch_key("m@2", {"top_k": 3})
    assert batch_key("m@1", {"top_k": 3}) != batch_key("m@1", {"top_k": 2})


def test_companions_are_the_offered_jobs_of_the_same_batch_claimed_once(store):
    queue = live_queue(store)
    first, *same = [job() for _ in range(5)]
    other = job(top_k=2)
    known = {j.id: j for j in [first, *same, other]}
    for offered in [first, *same, other]:
        batching.offer(store, offered, 60)
    assert queue.claim(first.id)
    assert not queue.claim(first.id)
    taken = queue.companions(first, 3, 0.0, known.get)
    assert [j.id for j in taken] == [j.id for j in same[:3]]  # oldest first, never the job itself
    assert not any(queue.claim(j.id) for j in taken)  # claimed for this worker
    # The rest of the list: the fourth, then nothing (the other parameters are another list).
    assert [j.id for j in queue.companions(first, 3, 0.0, known.get)] == [same[3].id]
    assert [j.id for j in queue.companions(other, 3, 0.0, known.get)] == []  # its own id is skipped
    queue.release([first.id])
    assert queue.claim(first.id)


def test_a_claim_lives_as_long_as_its_holders_heartbeat(store, monkeypatch):
    """A claim by a live worker is refused to others; one whose holder stopped beating is taken over, once."""
    monkeypatch.setattr(leases, "ALIVE_MIN_S", 0.0)  # judge death by the periods alone, to keep this test short
    held = job()
    holder = BatchQueue(store, lease_s=60, worker_id=new_worker_id())
    beat_alive(store, holder.claims.worker_id, 0.1)
    assert holder.claim(held.id)
    others = [live_queue(store) for _ in range(3)]
    assert not any(other.claim(held.id) for other in others)
    time.sleep(0.5)  # three periods without a beat: the holder is dead
    assert [other.claim(held.id) for other in others] == [True, False, False]
    holder.release([held.id])  # a late release by the dead holder does not drop the new claim
    assert not others[1].claim(held.id)


class _ReleasedWhileLooking:
    """A store whose claim on one job is released right after a worker's take fails (the API's hand-over ends)."""

    def __init__(self, store, key: str):
        self.store, self.key, self.armed = store, key, True

    def set_if_absent(self, key, value, ttl_s):
        taken = self.store.set_if_absent(key, value, ttl_s)
        if not taken and key == self.key and self.armed:
            self.armed = False
            self.store.delete(key)
        return taken

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_claim_released_while_a_worker_looks_at_it_is_taken_not_mistaken_for_a_live_holder(store):
    """False from claim() makes the task drop its message: it must mean a live holder, never a vanished one."""
    queued = job()
    key = leases.CLAIM_PREFIX + queued.id
    store.set(key, leases.handover_holder().encode(), 60)  # the API is queueing the job
    worker_id = new_worker_id()
    beat_alive(store, worker_id, 60)
    racing = BatchQueue(_ReleasedWhileLooking(store, key), lease_s=60, worker_id=worker_id)
    assert racing.claim(queued.id)
    assert leases.holder(store, queued.id) == worker_id


def test_the_api_hand_over_claim_is_taken_by_the_worker_at_once_and_reaped_only_when_old(store):
    """The worker given the message takes a fresh hand-over claim; the reaper leaves it until the grace is over."""
    fresh, stale, taken = job(), job(), job()
    long_ago = time.time() - leases.HANDOVER_GRACE_S - 1
    store.set(leases.CLAIM_PREFIX + fresh.id, leases.handover_holder().encode(), 60)
    store.set(leases.CLAIM_PREFIX + stale.id, leases.handover_holder(long_ago).encode(), 60)
    store.set(leases.CLAIM_PREFIX + taken.id, leases.handover_holder(long_ago).encode(), 60)
    assert live_queue(store).claim(taken.id)
    requeued: list[str] = []
    assert leases.reap(store, requeued.append) == [stale.id] == requeued
    assert leases.holder(store, fresh.id) is not None
    assert leases.holder(store, stale.id) is None


def test_jobs_that_need_no_work_or_are_held_elsewhere_are_passed_over(store):
    queue = live_queue(store)
    first, done, held, free = job(), job(), job(), job()
    for offered in (done, held, free):
        batching.offer(store, offered, 60)
    assert live_queue(store).claim(held.id)  # another worker's batch
    usable = {held.id: held, free.id: free}.get  # `done` needs no work any more
    assert [j.id for j in queue.companions(first, 2, 0.0, usable)] == [free.id]


def test_companions_wait_for_late_offers_but_not_past_the_deadline(store):
    queue = live_queue(store)
    first, late = job(), job()
    timer = threading.Timer(0.1, batching.offer, (store, late, 60))
    timer.start()
    started = time.monotonic()
    taken = queue.companions(first, 1, 5.0, {late.id: late}.get)
    assert [j.id for j in taken] == [late.id]
    assert time.monotonic() - started < 4.0, "a full batch returns at once"
    started = time.monotonic()
    assert queue.companions(first, 1, 0.2, lambda _: None) == []
    assert 0.15 <= time.monotonic() - started < 4.0
