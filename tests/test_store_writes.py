"""Store.writes: writes sent together, against a real redis-server and a real SQLite file."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from classlens.core.store import RedisStore, SqliteStore, StoreError
from tests.round_trips import measured, private_redis
from tests.test_faults import RedisServer


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path):
    if request.param == "redis":
        return RedisStore(request.getfixturevalue("redis_url"))
    return SqliteStore(tmp_path / "store.sqlite3")


def key() -> str:
    return f"test:{uuid.uuid4().hex}"


def test_every_write_is_applied_in_order(store):
    value, counter, items, claim, ring = key(), key(), key(), key(), key()
    store.set(claim, b"mine", 60)
    store.set(ring + ":0", b"older", 60)
    with store.writes() as batch:
        batch.set(value, b"one", 60)
        batch.set(value, b"two", 60)  # the later write wins, as it would one at a time
        batch.incr(counter)
        batch.incr(counter, 41)
        batch.push(items, b"a", 60)
        batch.push(items, b"b", 60)
        batch.delete_if(claim, b"someone else's")
        batch.notify(value)
        assert store.get(value) is None  # nothing is written before the block ends
    assert store.get(value) == b"two"
    assert store.get(counter) == b"42"
    assert store.pop(items, 5) == [b"a", b"b"]
    assert store.get(claim) == b"mine"  # compare-and-delete: held by another value, so kept
    with store.writes() as batch:
        batch.delete_if(claim, b"mine")
    assert store.get(claim) is None


def test_a_ring_keeps_the_last_values_put_in_it(store):
    counter, slots = key(), key() + ":"
    with store.writes() as batch:
        for value in (b"1", b"2", b"3", b"4"):
            batch.put_in_ring(counter, slots, 3, value, 60)
    assert store.get(counter) == b"4"
    assert [store.get(f"{slots}{slot}") for slot in range(3)] == [b"4", b"2", b"3"]
    with store.writes() as batch:
        batch.put_in_ring(counter, slots, 3, b"5", 60)
    assert [store.get(f"{slots}{slot}") for slot in range(4)] == [b"4", b"5", b"3", None]


def test_ring_slots_expire(store):
    counter, slots = key(), key() + ":"
    with store.writes() as batch:
        batch.put_in_ring(counter, slots, 2, b"soon gone", 0.05)
    time.sleep(0.2)
    assert store.get(f"{slots}0") is None
    assert store.get(counter) == b"1"  # a counter never expires


def test_nothing_is_written_when_the_block_raises(store):
    value, counter = key(), key()

    def interrupted() -> None:
        with store.writes() as batch:
            batch.set(value, b"one", 60)
            batch.incr(counter)
            raise RuntimeError("before the end")

    with pytest.raises(RuntimeError):
        interrupted()
    assert store.get(value) is None
    assert store.get(counter) is None


def test_a_block_without_writes_is_fine(store):
    with store.writes():
        pass


def test_a_notice_in_a_block_wakes_a_listener(store):
    channel, waited = key(), []
    with store.listen(channel) as listener:

        def wait() -> None:
            started = time.monotonic()
            listener.wait(30)
            waited.append(time.monotonic() - started)

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.1)
        with store.writes() as batch:
            batch.notify(channel)
        thread.join(30)
    assert len(waited) == 1
    assert waited[0] < 10  # woken, not timed out


@pytest.mark.integration
def test_redis_sends_a_block_in_one_round_trip(tmp_path):
    with private_redis(tmp_path) as server:
        _one_round_trip(RedisStore(server.url))


def _one_round_trip(store: RedisStore) -> None:
    with measured(store) as traffic, store.writes() as batch:
        for n in range(20):
            batch.incr(f"count:{n}")
        batch.set("value", b"v", 60)
        batch.push("list", b"item", 60)
        batch.delete_if("claim", b"mine")
        batch.put_in_ring("sequence", "slot:", 4, b"x", 60)
        batch.notify("value")
    assert traffic.round_trips == 1
    # Counted by the server: every write was made (a script's own calls are counted as well as the script).
    assert traffic.commands["incrby"] == 20
    assert traffic.commands["set"] == 2  # one by the client, one by the ring's script
    assert traffic.commands["rpush"] == traffic.commands["pexpire"] == 1
    assert traffic.commands["eval"] == 3  # the push, the compare-and-delete and the ring, each a script
    assert traffic.commands["publish"] == 1


@pytest.mark.integration
def test_redis_sends_a_block_again_when_the_connection_was_refused(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        store = RedisStore(server.url, timeout_s=2.0)
        store.ping()
        server.stop()
        restart = threading.Timer(0.5, server.start)
        restart.start()
        with store.writes() as batch:
            batch.incr("count")
            batch.set("value", b"v", 60)
        restart.join()
        assert store.get("count") == b"1"
        assert store.get("value") == b"v"
    finally:
        server.stop()


def test_redis_refusing_a_write_is_a_store_error(redis_url):
    store = RedisStore(redis_url)
    text = key()
    store.set(text, b"not a number", 60)

    def count_text() -> None:
        with store.writes() as batch:
            batch.incr(text)

    with pytest.raises(StoreError, match="not an integer"):
        count_text()


def test_sqlite_applies_a_block_in_one_transaction(tmp_path):
    path = tmp_path / "store.sqlite3"
    store = SqliteStore(path)
    value, counter, items = key(), key(), key()
    statements: list[str] = []
    connection = store._connection()
    connection.set_trace_callback(statements.append)
    with store.writes() as batch:
        batch.set(value, b"one", 60)
        batch.incr(counter)
        batch.push(items, b"a", 60)
        batch.put_in_ring(counter, value + ":", 2, b"r", 60)
    connection.set_trace_callback(None)
    assert [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "ROLLBACK")] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert (store.get(value), store.get(counter), store.get(value + ":1")) == (b"one", b"2", b"r")


def test_sqlite_writes_nothing_of_a_block_that_fails_half_way(tmp_path):
    store = SqliteStore(tmp_path / "store.sqlite3")
    value, items = key(), key()

    def failing() -> None:
        with store.writes() as batch:
            batch.set(value, b"one", 60)
            batch.push(items, b"a", 60)
            batch.set(key(), object(), 60)  # type: ignore[arg-type]  # SQLite cannot bind it: the write fails

    with pytest.raises(StoreError):
        failing()
    assert store.get(value) is None
    assert store.pop(items, 5) == []
    # The connection is usable afterwards: the failed transaction was rolled back, not left open.
    store.set(value, b"two", 60)
    assert store.get(value) == b"two"
    assert not store._connection().in_transaction
