"""``classlens bench-service``: the service benchmark (classlens/bench/service.py), printed and written as JSON."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from classlens.cli.common import open_catalog
from classlens.core.settings import Settings

# Images per model: fewer for ViT-S, whose explanations are the slow ones on CPU, so that a full
# run stays within minutes; --quick is a smoke run.
FULL = {"vit-small": 96, "other": 200, "cache_hits": 200}
QUICK = {"vit-small": 12, "other": 40, "cache_hits": 40}


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does, through the ``finally`` blocks that stop the service's processes."""

    def _exit(*_: object) -> None:
        sys.exit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("bench-service")
@click.option(
    "--model",
    "references",
    multiple=True,
    default=("fmnist-vit",),
    show_default=True,
    help="Registered model(s) to measure besides the random ViT-S; skipped with a warning when not registered.",
)
@click.option("--no-vit-small", is_flag=True, help="Skip the random-initialised vit_small_patch16_224.")
@click.option("--requests", type=click.IntRange(1, 10_000), help="Images per model [default: 96 for ViT-S, else 200].")
@click.option("--cache-hits", type=click.IntRange(1, 100_000), help="Cache-hit requests per model [default: 200].")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1, 64), help="Concurrent HTTP clients.")
@click.option(
    "--threads", type=click.IntRange(1, 256), help="Torch threads, here and in the worker [default: torch's]."
)
@click.option(
    "--timeout", default=900.0, show_default=True, type=click.FloatRange(1), help="Seconds per phase at most."
)
@click.option(
    "--batch-max",
    default=8,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Also measure a service that batches up to this many jobs across requests (1: skip).",
)
@click.option("--quick", is_flag=True, help="A short run: 12 ViT-S images, 40 of the others, 40 cache hits.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/service.json"))
@click.pass_obj
def bench_service_command(
    settings: Settings,
    references: tuple[str, ...],
    no_vit_small: bool,
    requests: int | None,
    cache_hits: int | None,
    clients: int,
    threads: int | None,
    timeout: float,
    batch_max: int,
    quick: bool,
    out: Path,
) -> None:
    """Raw worker throughput, service throughput with concurrent clients, and cache-hit latency, per model.

    Starts its own redis-server, one worker and the API on 127.0.0.1, and stops them on the way out.
    """
    from classlens.bench.service import BenchError, Plan, bench_service, format_table, register_random_vit
    from model_store.catalog import Catalog, ModelNotFoundError

    counts = QUICK if quick else FULL
    plan = Plan(cache_hits=cache_hits or counts["cache_hits"], clients=clients, timeout_s=timeout, batch_max=batch_max)
    with _sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="classlens-bench-service-") as temporary:
        work = Path(temporary)
        models: list[tuple[str, int]] = []
        if not no_vit_small:
            click.echo("registering a random vit_small_patch16_224 ...", err=True)
            models.append((register_random_vit(work / "models"), requests or counts["vit-small"]))
        user_catalog = open_catalog(settings)
        for reference in references:
            try:
                models.append((user_catalog.resolve(reference).reference, requests or counts["other"]))
            except ModelNotFoundError as error:
                click.secho(f"warning: skipping {reference}: {error}", fg="yellow", err=True)
        if not models:
            raise click.ClickException("nothing to measure: no model given is registered")
        catalog = Catalog.default([work / "models", *settings.model_roots])
        click.echo(f"measuring {', '.join(f'{name} ({count} images)' for name, count in models)} ...", err=True)
        try:
            record = bench_service(catalog, models, plan, work, threads)
        except BenchError as error:
            raise click.ClickException(str(error)) from error
    click.echo(format_table(record["service"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)
