"""Worker liveness through the store: how ``/readyz`` knows that some worker is alive.

Celery's own ping needs broadcast support in the broker (the embedded filesystem broker
does without it), so each worker process refreshes one key with a short TTL from a daemon
thread instead; the key exists exactly while some worker has beaten recently.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

from classlens.core import keys
from classlens.core.store import Store, StoreError

HEARTBEAT_KEY = keys.HEARTBEAT + "worker"


def beat(store: Store, period_s: float, name: str | None = None) -> None:
    """Say "alive" for three periods."""
    payload = {"worker": name or socket.gethostname(), "at": time.time()}
    store.set(HEARTBEAT_KEY, json.dumps(payload).encode(), period_s * 3)


def last_beat(store: Store) -> dict[str, object] | None:
    """The freshest heartbeat, or None when no worker has beaten within three periods."""
    data = store.get(HEARTBEAT_KEY)
    return None if data is None else dict(json.loads(data))


def start_heartbeat(store: Store, period_s: float, name: str | None = None) -> threading.Event:
    """Beat now and then every ``period_s`` in a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def run() -> None:
        while True:
            with contextlib.suppress(StoreError):  # the store is away: the key expires and /readyz says so
                beat(store, period_s, name)
            if stop.wait(period_s):
                return

    threading.Thread(target=run, name="classlens-heartbeat", daemon=True).start()
    return stop
