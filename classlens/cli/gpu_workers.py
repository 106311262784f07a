"""``classlens worker --gpus``: one worker process per GPU, supervised by a parent that never touches CUDA.

A CUDA context does not survive ``fork``, so the GPUs are counted without torch
(:func:`visible_gpus`: this module imports nothing of the worker), and each worker is a new
process (``subprocess``, not a fork) that sees its GPU alone through ``CUDA_VISIBLE_DEVICES``.
One worker process per GPU: every model a worker loads then lives on one card, a process's
caching allocator never spreads over two, and a crash takes one card's worker down, not the
others'. See docs/gpu.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import click

from classlens.core.processes import stop_process

log = logging.getLogger(__name__)

# The environment variable CUDA reads to decide which cards a process may see.
VISIBLE = "CUDA_VISIBLE_DEVICES"


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
    process (the workers' parent) leaves CUDA uninitialised.
    ``all`` on a machine without GPUs is one worker as configured; a count larger than the
    GPUs visible is an error.
    """
    if gpus == 0:
        return []
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


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this machine offers a worker, as ``CUDA_VISIBLE_DEVICES`` entries, without touching CUDA.

    ``CUDA_VISIBLE_DEVICES``, when set, is the answer (read as CUDA reads it: the list ends
    at the first entry that is not an index or a ``GPU-``/``MIG-`` UUID, so ``""`` and
    ``"-1"`` mean none). Otherwise ``nvidia-smi -L`` lists them; a GPU split into MIG
    instances is replaced by its instances. No ``nvidia-smi``, or one that fails: none.
    """
    environ = os.environ if environ is None else environ
    if VISIBLE in environ:
        return _parse_visible(environ[VISIBLE])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("nvidia-smi -L failed (%s); assuming no GPU", error)
        return []
    return parse_nvidia_smi(listing)


def _parse_visible(value: str) -> list[str]:
    gpus = []
    for entry in (part.strip() for part in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        gpus.append(entry)
    return gpus


def parse_nvidia_smi(listing: str) -> list[str]:
    """``nvidia-smi -L`` output as ``CUDA_VISIBLE_DEVICES`` entries.

    Lines ``GPU 0: NAME (UUID: GPU-...)`` give indices; indented ``MIG ... (UUID: MIG-...)``
    lines under a GPU give its instances, which take the GPU's place (CUDA runs a
    process on one MIG instance, addressed by its UUID).
    """
    gpus: list[str] = []
    instances: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        text = line.strip()
        if text.startswith("GPU ") and ":" in text:
            current = text[4 : text.index(":")].strip()
            if current.isdigit():
                gpus.append(current)
            else:
                current = None
        elif text.startswith("MIG ") and current is not None and "UUID: " in text:
            uuid = text.split("UUID: ", 1)[1].rstrip(")").strip()
            instances.setdefault(current, []).append(uuid)
    return [entry for gpu in gpus for entry in instances.get(gpu, [gpu])]


def worker_plan(gpus: list[str], base_env: Mapping[str, str]) -> list[dict[str, str]]:
    """One environment per worker process: one per GPU, or a single one for the CPU.

    Each GPU worker sees only its card (``CUDA_VISIBLE_DEVICES`` set to that entry, so it
    is ``cuda:0`` inside the worker) and runs on it (``CLASSLENS_DEVICE=cuda``, so a card
    that has gone missing is an error, not a CPU worker). Without GPUs the one worker
    keeps ``base_env`` with ``CLASSLENS_DEVICE=cpu``, unless ``base_env`` asks for CUDA,
    in which case it stays, so that the worker fails with :class:`DeviceError`'s message.
    """
    if not gpus:
        env = dict(base_env)
        if env.get("CLASSLENS_DEVICE", "auto").lower() != "cuda":
            env["CLASSLENS_DEVICE"] = "cpu"
        return [env]
    return [{**base_env, VISIBLE: gpu, "CLASSLENS_DEVICE": "cuda"} for gpu in gpus]
