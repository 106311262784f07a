"""Both store back-ends against the same behaviour: a real redis-server and a real SQLite file."""

import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from classlens.core import keys
from classlens.core.contract import ExplainRequest
from classlens.core.jobs import JobStore, content_key
from classlens.core.store import Delete, DeleteIf, Get, RedisStore, Set, SetIfAbsent, SqliteStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return RedisStore(url)
    return SqliteStore(tmp_path / "store.sqlite3")


def key() -> str:
    return f"test:{uuid.uuid4().hex}"


def test_get_set_delete_and_ttl(store):
    k = key()
    assert store.get(k) is None
    store.set(k, b"one", 60)
    assert store.get(k) == b"one"
    store.set(k, b"two", 0.2)
    assert store.get(k) == b"two"
    time.sleep(0.3)
    assert store.get(k) is None
    store.set(k, b"three", 60)
    store.delete(k)
    assert store.get(k) is None
    store.ping()


def test_set_if_absent_claims_once_and_again_after_expiry(store):
    k = key()
    assert store.set_if_absent(k, b"first", 0.3)
    assert not store.set_if_absent(k, b"second", 60)
    assert store.get(k) == b"first"
    time.sleep(0.4)
    assert store.set_if_absent(k, b"third", 60)
    assert store.get(k) == b"third"


def test_counters(store):
    k = key()
    assert store.incr(k) == 1
    assert store.incr(k, 5) == 6
    assert int(store.get(k)) == 6


def test_sqlite_is_shared_between_connections(tmp_path):
    first, second = SqliteStore(tmp_path / "s.sqlite3"), SqliteStore(tmp_path / "s.sqlite3")
    first.set("k", b"v", 60)
    assert second.get("k") == b"v"
    assert not second.set_if_absent("k", b"w", 60)


def test_content_key_is_canonical():
    a = ExplainRequest(targets=[1], layers=[2, 0]).model_dump(mode="json")
    b = dict(reversed(list(a.items())))
    assert content_key("w", "i", a) == content_key("w", "i", b)
    assert content_key("w", "i", a) != content_key("w", "j", a)


def _submit(jobs, key, queued):
    return jobs.submit(
        kind="explanation",
        model="m@1",
        parameters={},
        key=key,
        image_key="img",
        enqueue=lambda job: queued.append(job.id),
    )


def test_submit_joins_in_flight_then_caches(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    queued: list[str] = []
    k = key()
    first = _submit(jobs, k, queued)
    second = _submit(jobs, k, queued)
    assert first.outcome == "queued"
    assert second.outcome == "joined"
    assert second.job.id == first.job.id
    assert queued == [first.job.id]
    finished = jobs.succeed(jobs.start(first.job), b'{"answer": 42}')
    assert finished.status == "succeeded"
    assert store.get(f"inflight:{k}") is None
    third = _submit(jobs, k, queued)
    assert third.outcome == "cached"
    assert third.result == b'{"answer": 42}'
    assert third.job.status == "succeeded"
    assert queued == [first.job.id]


def test_a_failed_job_is_not_joined(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    queued: list[str] = []
    k = key()
    first = _submit(jobs, k, queued)
    failed = jobs.fail(first.job, "Broken", "it broke")
    assert failed.error is not None
    assert failed.error.title == "Broken"
    again = _submit(jobs, k, queued)
    assert again.outcome == "queued"
    assert again.job.id != first.job.id


def test_a_stale_claim_is_taken_over(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    k = key()
    store.set(f"inflight:{k}", b"vanished-job", 60)
    queued: list[str] = []
    submission = _submit(jobs, k, queued)
    assert submission.outcome == "queued"
    assert queued == [submission.job.id]


class ReadsTheClaimTogether:
    """A real store that lets two submitters, ``first`` and ``second`` (thread names), both read a claim first.

    ``first`` waits after its first read of ``claim`` until ``second`` has read it too, then goes on;
    ``second`` waits after its first read until ``first`` is done (``first_done``). The other calls
    go straight to the store. A claim read in a :meth:`round_trip` counts as read once the trip is back.
    """

    def __init__(self, store, claim):
        self._store, self._claim = store, claim
        self._read: set[str] = set()
        self.second_read, self.first_done = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def get(self, key):
        value = self._store.get(key)
        self._after_reading(key)
        return value

    def round_trip(self, commands):
        answers = self._store.round_trip(commands)
        for command in commands:
            if isinstance(command, Get):
                self._after_reading(command.key)
        return answers

    def _after_reading(self, key):
        me = threading.current_thread().name
        if key == self._claim and me not in self._read:
            self._read.add(me)
            if me == "first":
                assert self.second_read.wait(10)
            else:
                self.second_read.set()
                assert self.first_done.wait(10)


def test_two_submitters_that_find_the_same_stale_claim_queue_one_job(store):
    """Both take the claim for stale; the first takes it over, and the second must not drop the first's new claim."""
    k = key()
    store.set(f"inflight:{k}", b"vanished-job", 60)
    interleaved = ReadsTheClaimTogether(store, f"inflight:{k}")
    jobs = JobStore(interleaved, ttl_s=60, inflight_ttl_s=60)
    queued: list[str] = []
    outcomes: dict[str, object] = {}

    def submit(name):
        try:
            outcomes[name] = _submit(jobs, k, queued)
        finally:
            if name == "first":
                interleaved.first_done.set()

    threads = [threading.Thread(target=submit, args=(name,), name=name) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    first, second = outcomes["first"], outcomes["second"]
    assert (first.outcome, second.outcome) == ("queued", "joined")
    assert queued == [first.job.id]
    assert second.job.id == first.job.id
    assert store.get(f"inflight:{k}") == first.job.id.encode()


def test_release_leaves_a_claim_that_another_job_took_after_it_lapsed(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    k = key()
    first = _submit(jobs, k, [])
    store.set(f"inflight:{k}", b"next-job", 60)  # the first job's claim lapsed and another job claimed the key
    jobs.fail(first.job, "Broken", "it broke")
    assert store.get(f"inflight:{k}") == b"next-job"


def test_enqueue_failure_marks_the_job_failed(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    k = key()

    def refuse(job):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        jobs.submit(kind="explanation", model="m@1", parameters={}, key=k, image_key=None, enqueue=refuse)
    assert store.get(f"inflight:{k}") is None


def test_a_long_poll_is_woken_by_the_update_that_finishes_the_job(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    job = _submit(jobs, key(), []).job
    finisher = threading.Timer(0.3, lambda: jobs.succeed(jobs.start(job), b"{}"))
    finisher.start()
    started = time.monotonic()
    finished = jobs.wait(job, 30)
    finisher.join()
    # Woken by the update (Redis publishes it; SQLite looks again every 50 ms), long before the 30 s cap.
    assert finished.status == "succeeded"
    assert time.monotonic() - started < 15


def test_a_long_poll_gives_up_at_its_deadline_with_the_job_as_it_is(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    job = _submit(jobs, key(), []).job
    assert jobs.wait(job, 0.2).status == "queued"
    assert jobs.wait(job, 0).status == "queued"


def test_a_notice_nobody_listens_to_is_harmless(store):
    store.notify("nobody")
    with store.listen("somebody") as listener:
        store.notify("somebody")
        listener.wait(5)  # returns at once on Redis, after a short sleep on SQLite


def test_lists_pop_in_order_atomically_and_expire(store):
    k = key()
    assert store.pop(k, 3) == []
    for value in (b"a", b"b", b"c", b"d"):
        store.push(k, value, 60)
    assert store.pop(k, 3) == [b"a", b"b", b"c"]
    assert store.pop(k, 3) == [b"d"]
    assert store.pop(k, 3) == []
    # Two threads popping one list never get the same item.
    for number in range(200):
        store.push(k, str(number).encode(), 60)
    got: list[bytes] = []

    def drain() -> None:
        while items := store.pop(k, 7):
            got.extend(items)

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got, key=int) == [str(n).encode() for n in range(200)]
    store.push(k, b"old", 0.2)
    time.sleep(0.3)
    assert store.pop(k, 1) == []


def test_a_job_records_the_fingerprints_its_key_was_made_from(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    submitted = jobs.submit(
        kind="explanation",
        model="m@1",
        parameters={},
        key=key(),
        image_key="img",
        enqueue=lambda job: None,
        fingerprints={"m@1": "f" * 64},
    )
    assert jobs.get(submitted.job.id).fingerprints == {"m@1": "f" * 64}


def test_a_created_job_is_never_answered_from_the_cache_nor_joined(store):
    """Registrations have effects: two equal uploads are two jobs, each with its own result key."""
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    queued: list[str] = []
    first = jobs.create(
        job_id=uuid.uuid4().hex, kind="model", model="m@1", parameters={}, enqueue=lambda j: queued.append(j.id)
    )
    jobs.succeed(jobs.start(first), b'{"reference": "m@1"}')
    second = jobs.create(
        job_id=uuid.uuid4().hex, kind="model", model="m@1", parameters={}, enqueue=lambda j: queued.append(j.id)
    )
    assert queued == [first.id, second.id]
    assert second.status == "queued"
    assert first.content_key != second.content_key
    assert jobs.result(second.content_key) is None
    assert jobs.result(first.content_key) == b'{"reference": "m@1"}'


def test_a_created_job_that_cannot_be_queued_is_failed(store):
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    job_id = uuid.uuid4().hex

    def refuse(job):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        jobs.create(job_id=job_id, kind="model", model="m@1", parameters={}, enqueue=refuse)
    assert jobs.get(job_id).status == "failed"


def test_content_keys_carry_the_lens_version(monkeypatch):
    from classlens.core import contract

    before = content_key("w", "i", {})
    monkeypatch.setattr(contract, "LENS_VERSION", contract.LENS_VERSION + 1)
    assert content_key("w", "i", {}) != before


def test_no_key_prefix_starts_another():
    """So a sweep of one kind of key (``Store.keys(prefix)``) never returns keys of another kind."""
    assert len(set(keys.PREFIXES)) == len(keys.PREFIXES)
    assert all(p.endswith(":") for p in keys.PREFIXES)
    assert not [(a, b) for a in keys.PREFIXES for b in keys.PREFIXES if a != b and b.startswith(a)]
    table = keys.__doc__ or ""
    assert all(f"``{prefix}``" in table for prefix in keys.PREFIXES), "every prefix is in the module's table"


def test_key_prefixes_are_written_only_in_the_table():
    """The core, the API, the workers and the commands spell no prefix themselves: they take it from the table."""
    names = "|".join(re.escape(prefix) for prefix in keys.PREFIXES)
    quoted = re.compile(rf"""[fbr]?["']({names})""")
    table = Path(keys.__file__).resolve()
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for folder in ("classlens", "service", "worker")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.resolve() != table
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if quoted.search(line)
    ]
    assert not found, "\n".join(found)


def _rows(path) -> int:
    with sqlite3.connect(path) as connection:
        return sum(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("kv", "lists"))


def test_sqlite_writes_delete_expired_rows(tmp_path):
    """The embedded store does not grow forever: a write after ``purge_every_s`` deletes what has expired."""
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path, purge_every_s=1.0)
    store.set("short", b"v", 0.1)
    store.push("list", b"item", 0.1)
    store.incr("counter")  # never expires
    time.sleep(0.2)
    store.set("long", b"v", 60)  # within purge_every_s of the first write: nothing is purged yet
    assert _rows(path) == 4
    time.sleep(0.9)
    store.set_if_absent("other", b"v", 60)
    assert _rows(path) == 3  # counter, long, other
    assert store.get("long") == b"v"
    assert store.get("counter") == b"1"


def test_sqlite_first_write_purges_what_an_earlier_run_left(tmp_path):
    path = tmp_path / "s.sqlite3"
    earlier = SqliteStore(path, purge_every_s=3600)
    earlier.set("expires", b"v", 60)
    earlier.set("forgotten", b"v", 0.05)
    time.sleep(0.1)
    assert _rows(path) == 2
    SqliteStore(path, purge_every_s=3600).push("list", b"item", 60)
    assert _rows(path) == 2  # expires, and the list item
    assert earlier.purge_expired() == 0


def test_get_many_and_round_trip_answer_as_the_single_commands_do(store):
    a, b, c = key(), key(), key()
    store.set(a, b"one", 60)
    assert store.get_many([a, b, a]) == [b"one", None, b"one"]
    assert store.get_many([]) == []
    answers = store.round_trip(
        [
            Set(b, b"two", 60),
            SetIfAbsent(b, b"not this", 60),
            SetIfAbsent(c, b"three", 60),
            Get(b),
            DeleteIf(a, b"other"),
            DeleteIf(a, b"one"),
            Delete(c),
            Get(c),
        ]
    )
    assert answers == [None, False, True, b"two", False, True, None, None]
    assert store.get_many([a, b, c]) == [None, b"two", None]
    assert store.round_trip([]) == []
