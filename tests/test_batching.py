"""Cross-request batching (issue #6, item 3), its own logic against a real store: offers, claims, companions."""

from __future__ import annotations

import threading
import time

import pytest

from classlens import batching
from classlens.batching import BatchQueue, batch_key
from classlens.contract import Job
from classlens.jobs import new_job_id
from classlens.store import RedisStore, SqliteStore


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


def test_batch_key_separates_models_and_parameters():
    assert batch_key("m@1", {"top_k": 3}) == batch_key("m@1", {"top_k": 3})
    assert batch_key("m@1", {"top_k": 3}) != batch_key("m@2", {"top_k": 3})
    assert batch_key("m@1", {"top_k": 3}) != batch_key("m@1", {"top_k": 2})


def test_companions_are_the_offered_jobs_of_the_same_batch_claimed_once(store):
    queue = BatchQueue(store, lease_s=60)
    first, *same = [job() for _ in range(5)]
    other = job(top_k=2)
    known = {j.id: j for j in [first, *same, other]}
    for offered in [first, *same, other]:
        batching.offer(store, offered, 60)
    assert queue.claim(first.id) and not queue.claim(first.id)
    taken = queue.companions(first, 3, 0.0, known.get)
    assert [j.id for j in taken] == [j.id for j in same[:3]]  # oldest first, never the job itself
    assert not any(queue.claim(j.id) for j in taken)  # claimed for this worker
    # The rest of the list: the fourth, then nothing (the other parameters are another list).
    assert [j.id for j in queue.companions(first, 3, 0.0, known.get)] == [same[3].id]
    assert [j.id for j in queue.companions(other, 3, 0.0, known.get)] == []  # its own id is skipped
    queue.release([first.id])
    assert queue.claim(first.id)


def test_jobs_that_need_no_work_or_are_held_elsewhere_are_passed_over(store):
    queue = BatchQueue(store, lease_s=60)
    first, done, held, free = job(), job(), job(), job()
    for offered in (done, held, free):
        batching.offer(store, offered, 60)
    assert BatchQueue(store, lease_s=60).claim(held.id)  # another worker's batch
    usable = {held.id: held, free.id: free}.get  # `done` needs no work any more
    assert [j.id for j in queue.companions(first, 2, 0.0, usable)] == [free.id]


def test_companions_wait_for_late_offers_but_not_past_the_deadline(store):
    queue = BatchQueue(store, lease_s=60)
    first, late = job(), job()
    timer = threading.Timer(0.1, batching.offer, (store, late, 60))
    timer.start()
    started = time.monotonic()
    taken = queue.companions(first, 1, 5.0, {late.id: late}.get)
    assert [j.id for j in taken] == [late.id]
    assert time.monotonic() - started < 4.0, "a full batch returns at once"
    started = time.monotonic()
    assert queue.companions(first, 1, 0.2, {}.get) == []
    assert 0.15 <= time.monotonic() - started < 4.0
