"""What one job costs the API in Redis commands, counted on a real redis-server (``INFO commandstats`` deltas).

Each saving is asserted as a count, so that a change that adds a round trip fails here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import redis

from classlens.core.store import RedisStore

# Commands the counting itself issues: never part of a count.
_OWN = {"info", "config|resetstat", "config"}


def commands_during(url: str, action: Callable[[], object]) -> Counter[str]:
    """The commands the server ran while ``action`` ran (by name: ``get``, ``set``, ``psubscribe``...)."""
    client = redis.Redis.from_url(url)

    def calls() -> Counter[str]:
        stats = client.info("commandstats")
        return Counter({name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()})

    before = calls()
    action()
    after = calls()
    return Counter(
        {name: after[name] - before[name] for name in after if name not in _OWN and after[name] > before[name]}
    )


def channel() -> str:
    return f"test:{uuid.uuid4().hex}"


# -- one listener per process ------------------------------------------------------------------------


def test_long_polls_share_one_subscription_and_issue_no_command_of_their_own(redis_url):
    store = RedisStore(redis_url)
    with store.listen(channel()) as first:  # starts the listener thread: one PSUBSCRIBE
        first.wait(0.5)
    store.notify(channel())  # and the connection that commands use
    names = [channel() for _ in range(20)]
    woken: list[str] = []

    def poll(name: str, ready: threading.Barrier) -> None:
        with store.listen(name) as listener:
            ready.wait()
            listener.wait(10)
            woken.append(name)

    def twenty_long_polls() -> None:
        ready = threading.Barrier(len(names) + 1)
        threads = [threading.Thread(target=poll, args=(name, ready)) for name in names]
        for thread in threads:
            thread.start()
        ready.wait()
        started = time.monotonic()
        for name in names:
            store.notify(name)
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 5, "every waiter was woken by its notice, not by its timeout"

    counted = commands_during(redis_url, twenty_long_polls)
    assert sorted(woken) == sorted(names)
    # Only the notices themselves: no SUBSCRIBE, UNSUBSCRIBE or PING per long poll.
    assert counted == Counter({"publish": 20}), counted
    assert store._listener.waiting() == 0, "waiters that returned leave nothing behind"


def test_a_waiter_is_woken_by_its_own_channel_only(redis_url):
    store = RedisStore(redis_url)
    mine, other = channel(), channel()
    with store.listen(mine) as listener:
        listener.wait(2)  # the first wake may be the subscription's confirmation
        store.notify(other)
        started = time.monotonic()
        listener.wait(0.5)
        assert time.monotonic() - started >= 0.45, "a notice on another channel does not wake this waiter"
        store.notify(mine)
        started = time.monotonic()
        listener.wait(5)
        assert time.monotonic() - started < 2


def test_waiters_that_time_out_leave_nothing_behind(redis_url):
    store = RedisStore(redis_url)
    for _ in range(5):
        with store.listen(channel()) as listener:
            listener.wait(0.05)
    assert store._listener.waiting() == 0
    assert store._listener._waiters == {}


def test_the_listener_reconnects_when_its_connection_is_dropped(redis_url):
    store = RedisStore(redis_url)
    admin = redis.Redis.from_url(redis_url)
    name = channel()
    with store.listen(name) as listener:
        listener.wait(2)
        assert admin.pubsub_numpat() >= 1
        # Like a Redis restart, from the listener's side: its connection is closed under it.
        admin.client_kill_filter(_type="pubsub", skipme=True)
        deadline = time.monotonic() + 10
        while True:  # subscribed again (the listener thread found the dead socket)
            listener.wait(0.2)
            patterns = [client for client in admin.client_list(_type="pubsub") if int(client["psub"]) > 0]
            if patterns:
                break
            assert time.monotonic() < deadline, "the listener did not subscribe again"
        listener.wait(0.5)  # the wake that says "subscribed again, look"
        store.notify(name)
        started = time.monotonic()
        listener.wait(5)
        assert time.monotonic() - started < 2, "a notice after the reconnect wakes the waiter"


def test_a_long_poll_of_a_finished_job_issues_no_command(redis_url):
    from classlens.core.jobs import JobStore

    store = RedisStore(redis_url)
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60)
    job = jobs.create(job_id=uuid.uuid4().hex, kind="model", model="m@1", parameters={}, enqueue=lambda job: None)
    finished = jobs.succeed(job, b"{}")
    counted = commands_during(redis_url, lambda: jobs.wait(finished, 0.1))
    assert counted == Counter(), counted
