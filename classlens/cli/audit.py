"""``classlens audit DIR|ZIP --model M``: an audit through ``POST /v1/audits``, written as CSV, JSON and HTML.

With ``--url`` the audit runs on that service, through :class:`classlens.client.Client`. Without
it, the command starts the embedded service privately, as ``classlens serve`` does (the API on a
free loopback port, one ``classlens worker`` for the audit queue, broker and store in a temporary
folder), and audits through the same client. This is the simplest way to be sure the local audit
*is* the API's: the zip and its labels.csv are read by the API's own rules, the images checked
and explained by the same worker code, and the report is the API's own bytes, so nothing here
can drift from what ``POST /v1/audits`` answers. The cost is a few seconds to start the worker.

A folder is sent as one zip of its images (by suffix) with its ``labels.csv``, or the one given
with ``--labels`` (columns ``file`` and ``label``, file names relative to the folder or the zip's
root, a label being a class index or name). What the service refuses (a bad image, an unknown
label or model, an unsafe zip) is a one-line error with exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from classlens.cli.analyze import progress_bar
from classlens.core.audit_report import rows_csv
from classlens.core.audit_summary import summary_html
from classlens.core.queue import AUDIT_QUEUE
from classlens.core.settings import Settings

if TYPE_CHECKING:
    from classlens.client import Client

LOOPBACK = "127.0.0.1"
WORKER_START_S = 180.0


class BadInput(click.ClickException):
    """What the service refused as a bad request: exit status 2, as click's own usage errors."""

    exit_code = 2


def _tail(log: Path, characters: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-characters:]
    except OSError:
        return ""


def private_settings(settings: Settings, data_dir: Path) -> Settings:
    """The embedded service's settings: the user's models, a private data dir, no Redis, no keys (loopback only)."""
    return settings.model_copy(
        update={
            "data_dir": data_dir,
            "model_dirs": settings.model_roots,  # the user's `classlens models add` root stays searched
            "redis_url": None,
            "api_keys": None,
            "api_keys_file": None,
        }
    )


@contextlib.contextmanager
def embedded_service(settings: Settings) -> Iterator[tuple[str, Callable[[], None]]]:
    """The embedded API and one audit worker, private to this command; its URL and a worker check.

    The check raises a ClickException with the worker's log when the worker has exited.
    """
    from waitress import create_server

    from classlens.cli.serve import waitress_options
    from classlens.core.processes import free_port, stop_process
    from service.app import create_app

    with tempfile.TemporaryDirectory(prefix="classlens-audit-") as temporary:
        work = Path(temporary)
        private = private_settings(settings, work / "data")
        env = {name: value for name, value in os.environ.items() if name not in ("REDIS_URL", "CLASSLENS_REDIS_URL")}
        env |= {
            "CLASSLENS_DATA_DIR": str(private.data_dir),
            "CLASSLENS_MODEL_DIRS": os.pathsep.join(str(root) for root in private.model_dirs),
        }
        log = work / "worker.log"
        command = [sys.executable, "-m", "classlens.cli", "worker", f"--queues={AUDIT_QUEUE}", "--loglevel=WARNING"]
        with log.open("wb") as out:
            worker = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

        def check_worker() -> None:
            if worker.poll() is not None:
                raise click.ClickException(f"the audit worker exited with {worker.returncode}:\n{_tail(log)}")

        port = free_port()
        server = create_server(
            create_app(private, host=LOOPBACK), host=LOOPBACK, port=port, **waitress_options(private, threads=4)
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            yield f"http://{LOOPBACK}:{port}", check_worker
        finally:
            server.close()
            thread.join(10)
            stop_process(worker, grace_s=20)


def _wait_ready(client: Client, check_worker: Callable[[], None]) -> None:
    deadline = time.monotonic() + WORKER_START_S
    while not client.ready():
        check_worker()
        if time.monotonic() > deadline:
            raise click.ClickException(f"the embedded service was not ready after {WORKER_START_S:.0f} s")
        time.sleep(0.2)


def write_outputs(out: Path, report: bytes) -> list[Path]:
    """``rows.csv``, ``report.json`` (the API's bytes as they are) and ``summary.html`` under ``out``."""
    result = json.loads(report)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "rows.csv", out / "report.json", out / "summary.html"]
    written[0].write_text(rows_csv(result), encoding="utf-8", newline="")
    written[1].write_bytes(report)
    written[2].write_text(summary_html(result), encoding="utf-8")
    return written


def run_audit(
    client: Client, source: Path, model: str, labels: Path | None, check: Callable[[], None] | None = None
) -> bytes:
    """Audit ``source`` on the service behind ``client`` with a progress bar on stderr; the report's bytes."""
    from classlens.client import ClassLensError, InputError

    try:
        job = client.submit_audit(source, model, labels=labels)
        click.echo(f"audit {job.id}: {job.parameters.get('images', '?')} images on {job.model}", err=True)
        with progress_bar(f"auditing with {job.model}") as bar:

            def progress(done: int, total: int) -> None:
                if check is not None:
                    check()
                bar(done, total)

            job = client.wait(job, progress=progress)
        return client.report_json(job)
    except InputError as error:
        raise BadInput(str(error)) from error
    except ClassLensError as error:
        message = f"{error.title}: {error.detail}" if error.detail else error.title
        named = error.body.get("file")
        if isinstance(named, str) and named not in message:
            message += f" (file {named})"
        if error.client_error:
            raise BadInput(message) from error
        raise click.ClickException(message) from error


@click.command("audit")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--model", required=True, help="NAME or NAME@VERSION.")
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CSV with the columns file,label (names relative to SOURCE; label: class index or name).",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("classlens-audit"), show_default=True
)
@click.option("--url", help="A running ClassLens service (default: start the embedded one privately).")
@click.option("--api-key", help="The API key for --url (sent as Authorization: Bearer), when it needs one.")
@click.pass_obj
def audit_command(
    settings: Settings, source: Path, model: str, labels: Path | None, out: Path, url: str | None, api_key: str | None
) -> None:
    """Audit the images of SOURCE (a folder or a zip) with a model; write rows.csv, report.json and summary.html."""
    # Looked up, not imported: the embedded service's worker is another process, and needs torch, not this one.
    needed = ["requests"] if url else ["requests", "flask", "waitress", "torch"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        extras = "client" if url else "client,api,worker"
        raise click.ClickException(f"{', '.join(missing)} not installed: install ClassLens with the {extras} extras")
    from classlens.client import Client

    if url:
        with Client(url, api_key=api_key) as client:
            report = run_audit(client, source, model, labels)
    else:
        click.echo("starting the embedded service (no --url) ...", err=True)
        with embedded_service(settings) as (local, check_worker), Client(local) as client:
            _wait_ready(client, check_worker)
            report = run_audit(client, source, model, labels, check_worker)
    written = write_outputs(out, report)
    totals = json.loads(report)["aggregates"]
    accuracy = "no labels" if totals["accuracy"] is None else f"accuracy {totals['accuracy']:.3f}"
    click.echo(f"{totals['images']} images, {accuracy}; wrote {', '.join(str(path) for path in written)}", err=True)
