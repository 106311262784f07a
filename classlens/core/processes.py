"""Child processes the CLI starts (workers, the API, redis-server): a free port for each, stopped gracefully."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, for a child the caller is about to start on ``host``."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM (Celery finishes its running job; waitress and redis exit), then SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Supervised:
    """A child process that is started again whenever it exits, until :meth:`stop`: the embedded worker.

    Without it a worker that crashed (killed for memory, a broker hiccup) left ``classlens serve``
    accepting jobs that nobody would run. A checking thread looks every ``check_s`` seconds; a child
    that dies soon after its start is restarted after a growing pause, so a worker that cannot start
    at all does not spin. Each restart is logged with the exit status.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], subprocess.Popen[bytes]],
        *,
        check_s: float = 0.5,
        log: Callable[[str], None] = print,
    ):
        self.name = name
        self._start = start
        self._check_s = check_s
        self._log = log
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.restarts = 0
        self.process = start()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        pause_s = 0.0
        while not self._stopping.wait(self._check_s):
            with self._lock:
                code = self.process.poll()
                if code is None or self._stopping.is_set():
                    continue
                lived_s = time.monotonic() - self._started_at
                pause_s = 0.0 if lived_s > 30 else min(max(pause_s * 2, 1.0), 30.0)
                self._log(f"{self.name} (pid {self.process.pid}) exited with {code}; starting it again")
            if pause_s and self._stopping.wait(pause_s):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._start()
                self._started_at = time.monotonic()
                self.restarts += 1

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop supervising, then stop the child gracefully."""
        self._stopping.set()
        with self._lock:
            stop_process(self.process, grace_s)
        self._thread.join(grace_s)
