"""``classlens worker --gpus``: one worker process per GPU, supervised by a parent that never touches CUDA.

The GPUs are counted without torch (:func:`worker.devices.visible_gpus`), and each worker
is a new process (``subprocess``, not a fork) that sees its GPU alone through
``CUDA_VISIBLE_DEVICES``. See docs/gpu.md.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import click

from classlens.processes import stop_process


def parse_gpus(context: click.Context, parameter: click.Parameter, value: str) -> int | None:
    """``--gpus``: ``all`` (None) or a count (0: no per-GPU workers)."""
    if value.strip().lower() == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise click.BadParameter("expected 'all' or a number of GPUs (0: one worker, as configured)")
    return count


def gpu_plan(gpus: int | None, environ: Mapping[str, str]) -> list[dict[str, str]]:
    """The environments of the per-GPU workers ``--gpus`` asks for; empty: one worker in this process.

    Reads the GPUs from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``, never from torch, so this
    process (the workers' parent) leaves CUDA uninitialised (:mod:`worker.devices`).
    ``all`` on a machine without GPUs is one worker as configured; a count larger than the
    GPUs visible is an error.
    """
    if gpus == 0:
        return []
    from worker.devices import visible_gpus, worker_plan

    found = visible_gpus(environ)
    if gpus is not None:
        if gpus > len(found):
            raise click.UsageError(f"--gpus {gpus}: only {len(found)} GPU(s) visible ({', '.join(found) or 'none'})")
        found = found[:gpus]
    return worker_plan(found, environ) if found else []


def gpu_worker_command(index: int, queues: str, loglevel: str) -> list[str]:
    """``classlens worker`` for one GPU: one job at a time (solo pool), its own Celery node name."""
    return [
        sys.executable,
        "-m",
        "classlens.cli",
        "worker",
        "--gpus=0",
        f"--queues={queues}",
        "--concurrency=1",
        "--pool=solo",
        f"--loglevel={loglevel}",
        f"--hostname=classlens-gpu{index}@%h",
    ]


def _start_child(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start one worker process (tests replace this to see what would start)."""
    return subprocess.Popen(command, env=env)


def stop_all(children: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop every child at once (each may take its grace period to finish a job), and wait for all."""
    threads = [threading.Thread(target=stop_process, args=(child,)) for child in children]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def supervise(children: Sequence[subprocess.Popen[bytes]], poll_s: float = 1.0) -> int:
    """Wait until a child exits, then stop the others; the exit status is the first child's.

    A worker that dies takes the whole group down rather than being restarted here: the
    container's or service manager's restart policy then starts it fresh, with backoff,
    and a GPU that keeps failing shows up as a failing service. An exception in this
    process (``SystemExit`` from SIGTERM, ``KeyboardInterrupt``) also stops every child.
    """
    try:
        while True:
            for index, child in enumerate(children):
                code = child.poll()
                if code is not None:
                    click.echo(f"GPU worker {index} (pid {child.pid}) exited with status {code}; stopping the others")
                    return code
            time.sleep(poll_s)
    finally:
        stop_all(children)


def run_gpu_workers(plan: list[dict[str, str]], queues: str, loglevel: str) -> int:
    """Start one worker per GPU environment in ``plan`` and supervise them until one exits or SIGTERM."""
    gpus = ", ".join(env["CUDA_VISIBLE_DEVICES"] for env in plan)
    click.echo(f"{len(plan)} GPU(s) ({gpus}): starting one worker per GPU (concurrency 1, solo pool)")
    children: list[subprocess.Popen[bytes]] = []
    # SIGTERM (docker stop, systemd) raises SystemExit, so supervise()'s finally stops the workers.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        try:
            for index, env in enumerate(plan):
                children.append(_start_child(gpu_worker_command(index, queues, loglevel), env))
        except BaseException:
            stop_all(children)  # the ones already started, when starting another failed
            raise
        return supervise(children)
    finally:
        signal.signal(signal.SIGTERM, previous)
