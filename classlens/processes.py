"""Child processes the CLI starts (workers, the API, redis-server for benchmarks), stopped gracefully."""

from __future__ import annotations

import signal
import subprocess


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
