"""The key-value store behind jobs, uploaded images and the result cache.

One small interface, two back-ends, so that the same API and task code run with
Redis (``REDIS_URL`` set) and embedded on one machine (SQLite under the data dir):

- :class:`RedisStore`: ``SET ... PX`` for TTLs, ``SET NX`` for in-flight de-duplication.
- :class:`SqliteStore`: one table in WAL mode, shared safely by the API's threads and the
  worker process; expiry is checked on read, and ``set_if_absent`` treats an expired row
  as absent, so both back-ends agree on every operation. Expired rows are deleted by the
  writes themselves, at most once a minute per process, so the file does not grow forever.

Long polls wait on a :meth:`Store.listen` channel instead of re-reading a key on a timer:
Redis delivers ``PUBLISH`` at once, which keeps the API's CPU for requests. One thread per
process reads every notice from one pattern subscription and wakes the waiters of each
channel, so a long poll costs no command and no connection of its own (:class:`_RedisListener`).
SQLite has no notifications, so there a listener simply sleeps a short interval (one
machine, few clients).

Values are bytes: callers decide the encoding (JSON for records, raw bytes for images).
Every back-end failure is a :class:`StoreError`, which the API answers with a 503.

Bookkeeping that needs no answer (a finished job's records and counters) goes through
:meth:`Store.writes`: one pipeline, one round trip, with Redis; one transaction with SQLite.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from classlens.core import keys
from classlens.core.settings import Settings


class StoreError(RuntimeError):
    """The store cannot be reached or refused an operation."""


class Store(Protocol):
    """What the service and the workers need from a key-value store."""

    def get(self, key: str) -> bytes | None:
        """The value, or None when missing or expired."""
        ...

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` for ``ttl_s`` seconds, replacing any previous value."""
        ...

    def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Store ``value`` only when ``key`` is missing or expired; True when this call stored it."""
        ...

    def delete(self, key: str) -> None: ...

    def delete_if(self, key: str, value: bytes) -> bool:
        """Delete ``key`` only while it holds ``value`` (compare-and-delete); True when this call deleted it."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """The live keys that start with ``prefix`` (a sweep over a few claims, not a query over everything)."""
        ...

    def incr(self, key: str, amount: int = 1) -> int:
        """Add to an integer counter (created at 0, never expires) and return the new value."""
        ...

    def push(self, key: str, value: bytes, ttl_s: float) -> None:
        """Append ``value`` to the list at ``key``; the whole list expires ``ttl_s`` after the last push."""
        ...

    def pop(self, key: str, count: int) -> list[bytes]:
        """Remove and return up to ``count`` values from the head of the list at ``key`` (oldest first), atomically."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in order (None for each missing or expired one), in one round trip."""
        ...

    def round_trip(self, commands: Sequence[Command]) -> list[Any]:
        """Run ``commands`` in order, in one round trip where the back-end can; each one's answer, in order.

        Each command answers as the method of its name does (:class:`Set` None, :class:`SetIfAbsent`
        and :class:`DeleteIf` a bool, :class:`Get` the value or None, :class:`SetIfFound` the value it
        found). In order, not atomically: what one command decides cannot change what a later one
        does (a caller that needs that looks at the answers and sends another trip).
        """
        ...

    def ping(self) -> None:
        """Return when the store answers; :class:`StoreError` otherwise."""
        ...

    def notify(self, channel: str) -> None:
        """Wake whoever listens on ``channel`` (nobody listening is fine)."""
        ...

    def listen(self, channel: str) -> AbstractContextManager[Listener]:
        """Listen on ``channel`` from now on; re-read what you wait for *after* entering, then wait."""
        ...

    def writes(self) -> AbstractContextManager[Writes]:
        """Writes collected in a block and sent together when it ends: one round trip, or one transaction.

        For bookkeeping that needs no answer (counters, a finished job's records): nothing is
        written when the block raises, and what it wrote is applied in order. A Redis pipeline
        (``transaction=False``) is not atomic; SQLite applies it in one transaction.
        """
        ...


@dataclass(frozen=True)
class Get:
    key: str


@dataclass(frozen=True)
class Set:
    key: str
    value: bytes
    ttl_s: float


@dataclass(frozen=True)
class SetIfAbsent:
    key: str
    value: bytes
    ttl_s: float


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class DeleteIf:
    key: str
    value: bytes


@dataclass(frozen=True)
class SetIfFound:
    """Set ``key`` only while ``found`` holds a value, in one step; answers ``found``'s value (None: nothing set).

    A record that is worth writing only when what it refers to exists (a cache hit's job and its
    result) goes with the read that finds it: one trip, and never a record of a result that expired.
    """

    found: str
    key: str
    value: bytes
    ttl_s: float


@dataclass(frozen=True)
class Incr:
    key: str
    amount: int = 1


@dataclass(frozen=True)
class Push:
    key: str
    value: bytes
    ttl_s: float


@dataclass(frozen=True)
class Notify:
    channel: str


@dataclass(frozen=True)
class PutInRing:
    """Add 1 to ``counter`` (n), then set ``slot_prefix + str((n - 1) % size)``: a ring of ``size`` slots.

    Both in one step, since the slot depends on the counter's new value: the n-th value put in
    the ring replaces the one put ``size`` values before it. Answers n.
    """

    counter: str
    slot_prefix: str
    size: int
    value: bytes
    ttl_s: float


# One command of :meth:`Store.round_trip`: what the method of the same name does.
Command = Get | Set | SetIfAbsent | Delete | DeleteIf | SetIfFound | Incr | Push | Notify | PutInRing


def run_each(store: Store, commands: Sequence[Command]) -> list[Any]:
    """:meth:`Store.round_trip` by the store's own methods, one after the other (a back-end without pipelines)."""
    answers: list[Any] = []
    for command in commands:
        match command:
            case Get(key):
                answers.append(store.get(key))
            case Set(key, value, ttl_s):
                store.set(key, value, ttl_s)
                answers.append(None)
            case SetIfAbsent(key, value, ttl_s):
                answers.append(store.set_if_absent(key, value, ttl_s))
            case Delete(key):
                store.delete(key)
                answers.append(None)
            case DeleteIf(key, value):
                answers.append(store.delete_if(key, value))
            case SetIfFound():
                answers.append(_set_if_found(store, command))
            case Incr(key, amount):
                answers.append(store.incr(key, amount))
            case Push(key, value, ttl_s):
                store.push(key, value, ttl_s)
                answers.append(None)
            case Notify(channel):
                store.notify(channel)
                answers.append(None)
            case PutInRing(counter, slot_prefix, size, value, ttl_s):
                n = store.incr(counter)
                store.set(f"{slot_prefix}{(n - 1) % size}", value, ttl_s)
                answers.append(n)
    return answers


def _set_if_found(store: Store, command: SetIfFound) -> bytes | None:
    """:class:`SetIfFound` by the store's own methods (one step where the caller's transaction makes it one)."""
    present = store.get(command.found)
    if present is not None:
        store.set(command.key, command.value, command.ttl_s)
    return present


class Listener(Protocol):
    def wait(self, timeout_s: float) -> None:
        """Return on a notice or after ``timeout_s``, whichever comes first (early returns are allowed)."""
        ...


class _SleepingListener:
    """For stores without notifications: wait a short interval, then let the caller look again."""

    interval_s = 0.05

    def wait(self, timeout_s: float) -> None:
        time.sleep(max(0.0, min(self.interval_s, timeout_s)))


class _Waiter:
    """One :meth:`RedisStore.listen` in progress: its event is set by a notice on its channel."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def wait(self, timeout_s: float) -> None:
        # Cleared after waking, before the caller looks again: a notice from then on sets it anew.
        self.event.wait(max(0.0, timeout_s))
        self.event.clear()


class _RedisListener:
    """Every notice to one process, through one PubSub connection that one daemon thread reads.

    A long poll costs no Redis command of its own: the thread holds a pattern subscription to
    every notice channel (``notice:*``) and wakes the waiters registered on a channel through
    their events. A notice published while the subscription is not live (the first moments,
    or a Redis restart until redis-py has reconnected and subscribed again) is lost, so each
    confirmation of the subscription, and each failure, wakes every waiter to look again:
    nobody sleeps through a change. The thread ends after :attr:`idle_s` without waiters, and
    the next waiter starts another; a forked child starts its own.
    """

    poll_s = 1.0  # how often an idle thread looks up from the socket (to notice it may stop)
    idle_s = 30.0
    retry_s = 0.2  # after a failure, before connecting again

    def __init__(self, client: redis.Redis):
        self._client = client
        self._pattern = keys.NOTICE + "*"
        self._pid = -1
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._waiters: dict[bytes, set[_Waiter]] = {}
        self._thread: threading.Thread | None = None

    def waiting(self) -> int:
        """How many waiters are registered now (nothing is left behind by those that returned)."""
        with self._lock:
            return sum(len(waiters) for waiters in self._waiters.values())

    @contextmanager
    def listen(self, channel: str) -> Iterator[Listener]:
        if self._pid != os.getpid():  # a forked child: the parent's thread and waiters are not here
            self._reset()
        name, waiter = (keys.NOTICE + channel).encode(), _Waiter()
        with self._lock:
            self._waiters.setdefault(name, set()).add(waiter)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="classlens-notices", daemon=True)
                self._thread.start()
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(name)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[name]

    def _wake(self, name: bytes | None) -> None:
        """Wake the waiters on channel ``name``, or every waiter (None)."""
        with self._lock:
            groups = self._waiters.values() if name is None else [self._waiters.get(name, set())]
            for waiters in groups:
                for waiter in waiters:
                    waiter.event.set()

    def _stop_if_idle(self, idle_since: float) -> bool:
        """End the thread (True) after :attr:`idle_s` without waiters; decided under the lock that registers them."""
        with self._lock:
            if self._waiters or time.monotonic() - idle_since < self.idle_s:
                return False
            self._thread = None
            return True

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            pubsub = self._client.pubsub()
            try:
                pubsub.psubscribe(self._pattern)
                while True:
                    message = pubsub.get_message(timeout=self.poll_s)
                    if message is not None:
                        if message["type"] == "pmessage":
                            self._wake(bytes(message["channel"]))
                        elif message["type"] == "psubscribe":  # live from now on (also after a reconnect)
                            self._wake(None)
                    if self.waiting():
                        idle_since = time.monotonic()
                    elif self._stop_if_idle(idle_since):
                        return
            except Exception:  # never let the thread die with waiters on it; they look again and see the error
                self._wake(None)
                if self._stop_if_idle(idle_since):
                    return
                time.sleep(self.retry_s)
            finally:
                pubsub.close()


# Compare-and-delete in one step on the server: a claim is dropped only by (or for) the holder it names.
_DELETE_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"


def _reconnecting() -> Retry:
    """Ride through a Redis restart: a refused or dropped connection is tried again for about 2.5 s.

    A restarted redis-server with its append-only file answers again within a second, so callers
    never see it; a longer outage still surfaces as a :class:`StoreError` (a 503) within seconds.
    Only connection errors: a timeout already waited ``timeout_s`` and is not tried again.
    """
    return Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=5, supported_errors=(redis.ConnectionError,))


def _bytes(value: object) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[call-overload]


def _milliseconds(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisStore:
    """A :class:`Store` over one Redis database."""

    def __init__(self, url: str, *, timeout_s: float = 5.0):
        self.url = url
        self.timeout_s = timeout_s
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=_reconnecting()
        )
        self._listener = _RedisListener(self._client)

    def get(self, key: str) -> bytes | None:
        try:
            value = self._client.get(key)
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return _bytes(value)

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            self._client.set(key, value, px=_milliseconds(ttl_s))
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        try:
            return bool(self._client.set(key, value, px=_milliseconds(ttl_s), nx=True))
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def delete(self, key: str) -> None:
        try:
            self._client.delete(key)
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def delete_if(self, key: str, value: bytes) -> bool:
        try:
            return bool(self._client.eval(_DELETE_IF, 1, key, value))
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def keys(self, prefix: str) -> list[str]:
        try:
            found = self._client.scan_iter(match=prefix.replace("*", r"\*") + "*", count=500)
            return [key.decode() if isinstance(key, bytes) else str(key) for key in found]
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def incr(self, key: str, amount: int = 1) -> int:
        try:
            return int(self._client.incrby(key, amount))
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def push(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, value)
                pipe.pexpire(key, _milliseconds(ttl_s))
                pipe.execute()
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def pop(self, key: str, count: int) -> list[bytes]:
        try:
            values = self._client.lpop(key, count)
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return [v.encode() if isinstance(v, str) else bytes(v) for v in values or []]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            values = self._client.mget(list(keys))
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return [_bytes(value) for value in values]

    def round_trip(self, commands: Sequence[Command]) -> list[Any]:
        """One pipeline (no MULTI: commands in order, one round trip)."""
        if not commands:
            return []
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    _queue(pipe, command)
                replies = pipe.execute()  # retried on a refused connection like every command (_reconnecting)
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return [_answer(command, reply) for command, reply in zip(commands, replies, strict=True)]

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def notify(self, channel: str) -> None:
        try:
            self._client.publish(keys.NOTICE + channel, b"")
        except redis.RedisError as error:
            raise StoreError(f"redis: {error}") from error

    def listen(self, channel: str) -> AbstractContextManager[Listener]:
        return self._listener.listen(channel)

    def writes(self) -> AbstractContextManager[Writes]:
        return sent_together(self)


def _queue(pipe: redis.client.Pipeline, command: Command) -> None:
    """Put one command on a pipeline, as the :class:`RedisStore` method of its name sends it."""
    match command:
        case Get(key):
            pipe.get(key)
        case Set(key, value, ttl_s):
            pipe.set(key, value, px=_milliseconds(ttl_s))
        case SetIfAbsent(key, value, ttl_s):
            pipe.set(key, value, px=_milliseconds(ttl_s), nx=True)
        case Delete(key):
            pipe.delete(key)
        case DeleteIf(key, value):
            pipe.eval(_DELETE_IF, 1, key, value)
        case SetIfFound(found, key, value, ttl_s):
            pipe.eval(_SET_IF_FOUND, 2, found, key, value, _milliseconds(ttl_s))
        case Incr(key, amount):
            pipe.incrby(key, amount)
        case Push(key, value, ttl_s):
            pipe.eval(_PUSH, 1, key, value, _milliseconds(ttl_s))
        case Notify(channel):
            pipe.publish(keys.NOTICE + channel, b"")  # what notify() publishes
        case PutInRing(counter, slot_prefix, size, value, ttl_s):
            pipe.eval(_PUT_IN_RING, 1, counter, slot_prefix, size, value, _milliseconds(ttl_s))


def _answer(command: Command, reply: Any) -> Any:
    """A pipeline's reply to one command, as the method of its name answers."""
    match command:
        case Get() | SetIfFound():
            return _bytes(reply)
        case SetIfAbsent() | DeleteIf():
            return bool(reply)
        case Incr() | PutInRing():
            return int(reply)
        case _:
            return None


_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL)"
# Lists: one row per item, in insertion order (seq); a list's items share its latest expiry.
_LIST_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS lists (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, "
    "value BLOB NOT NULL, expires REAL NOT NULL)"
)


class SqliteStore:
    """A :class:`Store` in one SQLite file, for the embedded (no Redis) mode.

    A connection per thread and process (SQLite connections must not cross either);
    WAL lets the API read while the worker writes. ``expires`` is NULL for counters.

    Redis forgets expired keys by itself; here a write (``set``, ``set_if_absent``, ``push``)
    first deletes every expired row when ``purge_every_s`` have passed since this object last
    did (the first write always does, so rows left by an earlier run go too).
    """

    def __init__(self, path: Path, *, timeout_s: float = 10.0, purge_every_s: float = 60.0):
        self.path = path
        self.timeout_s = timeout_s
        self.purge_every_s = purge_every_s
        self._next_purge = time.monotonic()
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as connection:
            connection.execute(_SCHEMA)
            connection.execute(_LIST_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or getattr(self._local, "pid", None) != pid:
            try:
                connection = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as error:
                raise StoreError(f"sqlite {self.path}: {error}") from error
            self._local.connection, self._local.pid = connection, pid
        return connection

    def _run(self, sql: str, parameters: tuple[object, ...]) -> sqlite3.Cursor:
        try:
            return self._connection().execute(sql, parameters)
        except sqlite3.Error as error:
            raise StoreError(f"sqlite {self.path}: {error}") from error

    def get(self, key: str) -> bytes | None:
        row = self._run(
            "SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)", (key, time.time())
        ).fetchone()
        if row is None:
            return None
        value = row[0]
        return value.encode() if isinstance(value, str) else bytes(value)  # counters are stored as text

    def _purge_when_due(self) -> None:
        """:meth:`purge_expired` when ``purge_every_s`` have passed (two threads at once may both purge: harmless)."""
        now = time.monotonic()
        if now >= self._next_purge:
            self._next_purge = now + self.purge_every_s
            self.purge_expired()

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._purge_when_due()
        self._run("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)", (key, value, time.time() + ttl_s))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): what happens inside is atomic for every other process.

        Within a transaction already open (:meth:`writes`), it is part of that one.
        """
        connection = self._connection()
        if connection.in_transaction:  # inside writes(): part of its transaction, committed with it
            yield connection
            return
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise StoreError(f"sqlite {self.path}: {error}") from error

    def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        self._purge_when_due()
        now = time.time()
        with self._transaction() as connection:  # the expired row goes and the new one comes in atomically
            connection.execute("DELETE FROM kv WHERE key = ? AND expires IS NOT NULL AND expires <= ?", (key, now))
            cursor = connection.execute(
                "INSERT OR IGNORE INTO kv (key, value, expires) VALUES (?, ?, ?)", (key, value, now + ttl_s)
            )
        return cursor.rowcount == 1

    def push(self, key: str, value: bytes, ttl_s: float) -> None:
        self._purge_when_due()
        expires = time.time() + ttl_s
        with self._transaction() as connection:
            connection.execute("INSERT INTO lists (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))
            connection.execute("UPDATE lists SET expires = ? WHERE key = ?", (expires, key))

    def pop(self, key: str, count: int) -> list[bytes]:
        with self._transaction() as connection:
            rows = connection.execute(
                "SELECT seq, value FROM lists WHERE key = ? AND expires > ? ORDER BY seq LIMIT ?",
                (key, time.time(), count),
            ).fetchall()
            connection.executemany("DELETE FROM lists WHERE seq = ?", [(row[0],) for row in rows])
        return [bytes(row[1]) for row in rows]

    def delete(self, key: str) -> None:
        self._run("DELETE FROM kv WHERE key = ?", (key,))

    def delete_if(self, key: str, value: bytes) -> bool:
        cursor = self._run(
            "DELETE FROM kv WHERE key = ? AND value = ? AND (expires IS NULL OR expires > ?)", (key, value, time.time())
        )
        return cursor.rowcount == 1

    def keys(self, prefix: str) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._run(
            "SELECT key FROM kv WHERE key LIKE ? ESCAPE '\\' AND (expires IS NULL OR expires > ?)",
            (escaped + "%", time.time()),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def incr(self, key: str, amount: int = 1) -> int:
        row = self._run(
            "INSERT INTO kv (key, value, expires) VALUES (?, CAST(? AS TEXT), NULL) "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT) RETURNING value",
            (key, amount, amount),
        ).fetchone()
        return int(row[0])

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        rows = self._run(
            f"SELECT key, value FROM kv WHERE key IN ({marks}) AND (expires IS NULL OR expires > ?)",
            (*keys, time.time()),
        ).fetchall()
        found = {str(row[0]): row[1] for row in rows}
        return [_bytes(found.get(key)) for key in keys]

    def round_trip(self, commands: Sequence[Command]) -> list[Any]:
        """One process and a local file: no trip to save; each command runs as its method does, in one transaction."""
        with self._transaction():  # the methods' own transactions (push, set_if_absent) join this one
            return run_each(self, commands)

    def ping(self) -> None:
        self._run("SELECT 1", ())

    def notify(self, channel: str) -> None:
        """Nothing to do: listeners look again after a short sleep."""

    @contextmanager
    def listen(self, channel: str) -> Iterator[Listener]:
        yield _SleepingListener()

    def purge_expired(self) -> int:
        """Delete expired rows (writes call this every ``purge_every_s``); the number deleted."""
        now = time.time()
        lists = self._run("DELETE FROM lists WHERE expires <= ?", (now,)).rowcount
        return lists + self._run("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,)).rowcount

    def writes(self) -> AbstractContextManager[Writes]:
        return sent_together(self)


def open_store(settings: Settings) -> Store:
    """Redis when ``settings.redis_url`` is set, else SQLite under the data dir."""
    if settings.redis_url:
        return RedisStore(settings.redis_url)
    return SqliteStore(settings.data_dir / "store.sqlite3")


# --- Writes sent together (Store.writes) ------------------------------------------------------------------


class Writes:
    """The writes :meth:`Store.writes` collects, sent by :meth:`Store.round_trip` when its block ends; none answers."""

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.commands.append(Set(key, value, ttl_s))

    def incr(self, key: str, amount: int = 1) -> None:
        self.commands.append(Incr(key, amount))

    def push(self, key: str, value: bytes, ttl_s: float) -> None:
        self.commands.append(Push(key, value, ttl_s))

    def delete_if(self, key: str, value: bytes) -> None:
        self.commands.append(DeleteIf(key, value))

    def notify(self, channel: str) -> None:
        self.commands.append(Notify(channel))

    def put_in_ring(self, counter: str, slot_prefix: str, size: int, value: bytes, ttl_s: float) -> None:
        """:class:`PutInRing`: the counter's next value chooses the slot the value replaces."""
        self.commands.append(PutInRing(counter, slot_prefix, size, value, ttl_s))


@contextmanager
def sent_together(store: Store) -> Iterator[Writes]:
    """The body of :meth:`Store.writes`: collect, then one :meth:`Store.round_trip` (nothing when the block raises)."""
    writes = Writes()
    yield writes
    store.round_trip(writes.commands)


# The ring's two steps on the server. The slot's key is made from the counter, so it cannot be among KEYS
# (one Redis, not a cluster).
_PUT_IN_RING = (
    "local n = redis.call('INCR', KEYS[1]) "
    "redis.call('SET', ARGV[1] .. ((n - 1) % tonumber(ARGV[2])), ARGV[3], 'PX', ARGV[4]) "
    "return n"
)
# SetIfFound: read KEYS[1]; only when it holds a value, set KEYS[2]. Answers the value read (nil: none).
_SET_IF_FOUND = (
    "local found = redis.call('GET', KEYS[1]) "
    "if found then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end "
    "return found"
)
# push()'s two commands as one: append, and the list expires ttl after the last push.
_PUSH = "redis.call('RPUSH', KEYS[1], ARGV[1]) redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 0"
