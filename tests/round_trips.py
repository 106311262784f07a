"""What a piece of code asks of a real redis-server: round trips, counted on the client, and commands, counted
by the server itself (``INFO commandstats``).

A round trip is one send of the client's connection followed by reading its answers: one command on its
own, or a whole pipeline. Only this thread's sends are counted, so a background thread of the test process
(a worker's heartbeat) does not blur them; the server's command counts are exact only on a server of the
test's own (:func:`private_redis`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from classlens.core.store import RedisStore
from tests.test_faults import RedisServer


@dataclass
class Traffic:
    """Round trips sent by the measuring thread, and the commands the server ran meanwhile (once measured)."""

    round_trips: int = 0
    commands: Counter[str] = field(default_factory=Counter)

    @property
    def total_commands(self) -> int:
        return sum(self.commands.values())


def command_calls(client: redis.Redis) -> Counter[str]:
    """Calls of each command the server has run since its start (or its last ``CONFIG RESETSTAT``)."""
    stats: dict[str, Any] = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()})


@contextmanager
def measured(store: RedisStore) -> Iterator[Traffic]:
    """Count ``store``'s round trips from this thread, and the server's commands, while the block runs.

    The store's connections are made anew with a counting class (the handshake of the first one is
    made here, before counting starts).
    """
    traffic = Traffic()
    owner = threading.get_ident()
    pool = store._client.connection_pool
    plain = pool.connection_class

    class Counting(plain):  # type: ignore[valid-type, misc]
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if threading.get_ident() == owner:
                traffic.round_trips += 1
            super().send_packed_command(command, check_health)

    pool.reset()
    pool.connection_class = Counting
    observer = redis.Redis.from_url(store.url)
    try:
        store.ping()
        traffic.round_trips = 0
        before = command_calls(observer)
        yield traffic
        after = command_calls(observer)
        traffic.commands = Counter({name: n - before[name] for name, n in after.items() if name != "info"})
        traffic.commands = +traffic.commands  # drop the zeros
    finally:
        pool.reset()
        pool.connection_class = plain
        observer.close()


@contextmanager
def private_redis(folder: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (files under ``folder``): nothing else runs commands on it."""
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
