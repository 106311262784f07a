"""``classlens serve`` (the HTTP API) and ``classlens worker`` (a Celery worker).

Without ``REDIS_URL``, ``serve`` is the whole service on one machine: it starts its own
``classlens worker`` processes over the embedded broker and store (under the data dir), one for
explanations and registrations and one for audits and analyses (heavy work never runs ahead of
an explanation), supervises them (a worker that dies is started again, with a log line) and
stops them on exit. With ``REDIS_URL`` the two run separately, as many as needed.

waitress is configured for a server facing untrusted clients: many more connections than its
default 100 (slow clients holding sockets open took the API down), a channel timeout that closes
connections that send nothing, and long polls capped (``max_long_polls``) below the thread count,
so ``/livez``, ``/readyz`` and short requests always find a thread.

``classlens worker --gpus all`` runs one worker process per GPU and supervises them
(:mod:`classlens.cli.gpu_workers`); the supervising process never touches CUDA (docs/gpu.md).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from classlens.cli import gpu_workers
from classlens.core.processes import Supervised
from classlens.core.queue import ALL_QUEUES, ANALYSIS_QUEUE, AUDIT_QUEUE, EXPLAIN_QUEUE, MODELS_QUEUE
from classlens.core.settings import Settings, redacted_url
from model_store.catalog import BUNDLED_SAMPLES

SAMPLES = BUNDLED_SAMPLES


def _start_worker(queues: tuple[str, ...] = ALL_QUEUES) -> subprocess.Popen[bytes]:
    """``classlens worker`` on ``queues`` as a child with this process's environment (hence the same settings)."""
    command = [sys.executable, "-m", "classlens.cli", "worker", f"--queues={','.join(queues)}"]
    return subprocess.Popen(command, env=os.environ.copy())


def embedded_worker_queues(settings: Settings) -> list[tuple[str, ...]]:
    """The queues of each embedded worker: light work apart from heavy work, unless told otherwise."""
    if not settings.embedded_separate_heavy:
        return [ALL_QUEUES]
    return [(EXPLAIN_QUEUE, MODELS_QUEUE), (AUDIT_QUEUE, ANALYSIS_QUEUE)]


def supervise_workers(
    settings: Settings, start: Callable[[tuple[str, ...]], subprocess.Popen[bytes]] = _start_worker
) -> list[Supervised]:
    """Start the embedded workers under supervision (``start(queues)`` makes one process)."""
    return [
        Supervised(f"worker [{','.join(queues)}]", functools.partial(start, queues), log=click.echo)
        for queues in embedded_worker_queues(settings)
    ]


def waitress_options(settings: Settings, threads: int) -> dict[str, Any]:
    """waitress's settings for a server that slow or abusive clients must not stop."""
    return {
        "threads": threads,
        "connection_limit": settings.http_connection_limit,
        "channel_timeout": settings.http_channel_timeout_s,
        "cleanup_interval": max(1, min(30, settings.http_channel_timeout_s // 2)),
        "backlog": 2048,
        "asyncore_use_poll": True,  # select() fails past 1024 descriptors
        "ident": "classlens",
    }


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

    # Long polls may hold at most half the threads: the rest answer health checks and short requests.
    settings = settings.model_copy(update={"max_long_polls": min(settings.max_long_polls, max(1, threads // 2))})
    from service.auth import KeyFileError

    try:
        app = create_app(settings, host=host)
    except KeyFileError as error:  # a bad key file must stop the start, not leave the API open or half-configured
        raise click.ClickException(str(error)) from error
    auth = app.extensions["classlens"].auth
    click.echo(f"authentication {auth.reason}", err=not auth.enabled)
    workers: list[Supervised] = []
    if settings.redis_url:
        click.echo(f"using Redis at {redacted_url(settings.redis_url)}; start workers with: classlens worker")
    else:
        click.echo(f"embedded mode: broker and store under {settings.data_dir}; starting supervised workers")
        workers = supervise_workers(settings)
    base = f"http://{host}:{port}"
    click.echo(f"ClassLens API on {base} (docs: {base}/docs). Try:\n  {_curl_example(base, settings)}")
    # SIGTERM (docker stop, systemd) ends the server like Ctrl-C does, so the worker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(app, host=host, port=port, **waitress_options(settings, threads))
    finally:
        for worker in workers:
            worker.stop()


@click.command("worker")
@click.option("--queues", default=",".join(ALL_QUEUES), show_default=True, help="Comma-separated queues to consume.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--pool", type=click.Choice(["solo", "prefork", "threads"]), default="solo", show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--gpus",
    default="0",
    show_default=True,
    callback=gpu_workers.parse_gpus,
    help="'all' or N: one worker process per GPU (concurrency 1, solo pool each), supervised by this one; "
    "0, or no GPU visible with 'all': one worker, as configured. See docs/gpu.md.",
)
@click.option("--hostname", default="classlens@%h", show_default=True, hidden=True, help="Celery node name.")
@click.pass_obj
def worker_command(
    settings: Settings, queues: str, concurrency: int, pool: str, loglevel: str, gpus: int | None, hostname: str
) -> None:
    """Run a Celery worker for the explain (gpu), audit and analysis queues (or one per GPU)."""
    plan = gpu_workers.gpu_plan(gpus, os.environ)
    if plan:
        sys.exit(gpu_workers.run_gpu_workers(plan, queues, loglevel))
    if settings.device == "cuda" and pool != "prefork":
        # Fail at start, not at the first job. Only where the jobs run in this process: a prefork
        # parent must not touch CUDA (its children could not use it), so they find out themselves.
        from worker.devices import DeviceError, resolve_device

        try:
            resolve_device(settings.device)
        except DeviceError as error:
            raise click.ClickException(str(error)) from error

    from celery.signals import worker_ready

    from classlens.core.heartbeat import start_heartbeat
    from classlens.core.queue import create_celery
    from classlens.core.store import open_store

    # The tasks build their runtime in each worker process from these same settings, read from the environment.
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
