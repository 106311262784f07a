"""Round trip of one small message through an embedded broker transport: put, then get.

``python -m classlens.bench.broker_rtt classlens-fs filesystem``: for each transport named, a
kombu ``SimpleQueue`` in a fresh temporary folder, 500 messages one at a time, p50 and p99 in ms.
One transport per process (kombu's filesystem transports share state within a process).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kombu import Connection

import classlens.core.embedded_broker  # noqa: F401  (registers classlens-fs://)


def round_trips(scheme: str, count: int = 500) -> list[float]:
    """Milliseconds from put to a received, acknowledged message, ``count`` times."""
    folder = Path(tempfile.mkdtemp())
    for sub in ("queue", "control"):
        (folder / sub).mkdir()
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }
    times = []
    with Connection(f"{scheme}://", transport_options=options) as connection:
        queue = connection.SimpleQueue("gpu")
        for n in range(count):
            started = time.perf_counter()
            queue.put({"args": ["x" * 32], "n": n})
            queue.get(timeout=5).ack()
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def main(schemes: list[str]) -> None:
    if len(schemes) > 1:
        for scheme in schemes:
            subprocess.run([sys.executable, "-m", __spec__.name if __spec__ else __name__, scheme], check=True)
        return
    times = round_trips(schemes[0])
    p99 = times[int(len(times) * 0.99)]
    print(f"{schemes[0]:13s} n={len(times)} p50={statistics.median(times):.3f} ms p99={p99:.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1:] or ["classlens-fs", "filesystem"])
