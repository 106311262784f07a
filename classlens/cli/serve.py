"""``classlens serve`` (the HTTP API) and ``classlens worker`` (a Celery worker).

Without ``REDIS_URL``, ``serve`` is the whole service on one machine: it starts its own
``classlens worker`` process over the embedded broker and store (under the data dir), and
stops it on exit. With ``REDIS_URL`` the two run separately, as many as needed.

``classlens worker --gpus all`` runs one worker process per GPU and supervises them; the
supervising process never touches CUDA (docs/gpu.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from classlens.processes import stop_process
from classlens.queue import ALL_QUEUES
from classlens.settings import Settings

SAMPLES = Path(__file__).resolve().parents[2] / "model_store" / "samples" / "fashion-mnist"


def _start_worker() -> subprocess.Popen[bytes]:
    """``classlens worker`` as a child with this process's environment (hence the same settings)."""
    command = [sys.executable, "-m", "classlens.cli", "worker"]
    return subprocess.Popen(command, env=os.environ.copy())


def _curl_example(base: str, settings: Settings) -> str:
    from model_store.catalog import Catalog

    catalog = Catalog.default(settings.model_roots)
    names = [entry.reference for entry in catalog.latest() if "vit" in entry.manifest.architecture]
    model = names[0] if names else (catalog.names() or ["MODEL"])[0]
    samples = sorted(SAMPLES.glob("*.png"))
    image = samples[0] if samples else Path("IMAGE.png")
    return f"curl -s -F image=@{image} -F model={model} '{base}/v1/explanations?wait=20'"


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1, 256), help="HTTP threads.")
@click.pass_obj
def serve_command(settings: Settings, host: str, port: int, threads: int) -> None:
    """Serve the HTTP API (and, without REDIS_URL, an embedded worker)."""
    from waitress import serve

    from service.app import create_app

    app = create_app(settings)
    worker = None
    if settings.redis_url:
        click.echo(f"using Redis at {settings.redis_url}; start workers with: classlens worker")
    else:
        click.echo(f"embedded mode: broker and store under {settings.data_dir}; starting a worker")
        worker = _start_worker()
    base = f"http://{host}:{port}"
    click.echo(f"ClassLens API on {base} (docs: {base}/docs). Try:\n  {_curl_example(base, settings)}")
    # SIGTERM (docker stop, systemd) ends the server like Ctrl-C does, so the worker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(app, host=host, port=port, threads=threads)
    finally:
        if worker is not None:
            stop_process(worker)


def _parse_gpus(context: click.Context, parameter: click.Parameter, value: str) -> int | None:
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


def _run_gpu_workers(plan: list[dict[str, str]], queues: str, loglevel: str) -> int:
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


@click.command("worker")
@click.option("--queues", default=",".join(ALL_QUEUES), show_default=True, help="Comma-separated queues to consume.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--pool", type=click.Choice(["solo", "prefork", "threads"]), default="solo", show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--gpus",
    default="0",
    show_default=True,
    callback=_parse_gpus,
    help="'all' or N: one worker process per GPU (concurrency 1, solo pool each), supervised by this one; "
    "0, or no GPU visible with 'all': one worker, as configured. See docs/gpu.md.",
)
@click.option("--hostname", default="classlens@%h", show_default=True, hidden=True, help="Celery node name.")
@click.pass_obj
def worker_command(
    settings: Settings, queues: str, concurrency: int, pool: str, loglevel: str, gpus: int | None, hostname: str
) -> None:
    """Run a Celery worker for the explain (gpu), audit and analysis queues (or one per GPU)."""
    plan = gpu_plan(gpus, os.environ)
    if plan:
        sys.exit(_run_gpu_workers(plan, queues, loglevel))
    if settings.device == "cuda" and pool != "prefork":
        # Fail at start, not at the first job. Only where the jobs run in this process: a prefork
        # parent must not touch CUDA (its children could not use it), so they find out themselves.
        from worker.devices import DeviceError, resolve_device

        try:
            resolve_device(settings.device)
        except DeviceError as error:
            raise click.ClickException(str(error)) from error

    from celery.signals import worker_ready

    import worker.tasks as tasks
    from classlens.heartbeat import start_heartbeat
    from classlens.queue import create_celery
    from classlens.store import open_store

    tasks.configure(settings)
    app = create_celery(settings, include_tasks=True)
    store = open_store(settings)

    def _ready(**_: Any) -> None:
        start_heartbeat(store, settings.worker_heartbeat_s)

    worker_ready.connect(_ready, weak=False)
    app.worker_main(
        [
            "worker",
            f"--queues={queues}",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            f"--hostname={hostname}",
        ]
    )
