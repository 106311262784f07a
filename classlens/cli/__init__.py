"""The ``classlens`` command line: one group, a module per command family.

Torch is imported only inside the commands that need it, so that ``classlens
models list`` stays light and the API image (no torch) can run the CLI.
"""

from __future__ import annotations

import click

from classlens.cli.analyze import analyze_command
from classlens.cli.audit import audit_command
from classlens.cli.bench import bench_command, bench_memory_command
from classlens.cli.bench_service import bench_service_command
from classlens.cli.evaluate import evaluate_command
from classlens.cli.explain import explain_command
from classlens.cli.keys import keys
from classlens.cli.models import models
from classlens.cli.serve import serve_command, worker_command
from classlens.cli.soak import soak_command
from classlens.core.settings import Settings


@click.group()
@click.version_option(package_name="classlens")
@click.pass_context
def main(context: click.Context) -> None:
    """ClassLens: explain image classifiers in their class embedding space."""
    context.obj = Settings()


main.add_command(models)
main.add_command(keys)
main.add_command(explain_command)
main.add_command(analyze_command)
main.add_command(audit_command)
main.add_command(bench_command)
main.add_command(bench_memory_command)
main.add_command(bench_service_command)
main.add_command(evaluate_command)
main.add_command(serve_command)
main.add_command(worker_command)
main.add_command(soak_command)
