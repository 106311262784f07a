"""``classlens bench``: the lens benchmark (see worker/benchmarks/lens.py), printed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from classlens.cli.common import open_catalog, resolve
from classlens.settings import Settings


@click.command("bench")
@click.option("--model", "reference", default="fmnist-vit", show_default=True, help="Registered model to measure.")
@click.option("--no-vit-base", is_flag=True, help="Skip the random-initialised vit_base_patch16_224.")
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 8), show_default=True)
@click.option("--repeats", default=7, show_default=True, help="Timed runs of the fast methods (median reported).")
@click.option("--no-ig", is_flag=True, help="Skip Captum Integrated Gradients (the slowest method).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/lens.json"))
@click.pass_obj
def bench_command(settings: Settings, reference: str, **options: Any) -> None:
    """Time forward, explain, gradient map, Grad-CAM and Integrated Gradients as ratios to the forward pass."""
    # Through worker.*: the torchvision compatibility step runs before timm is imported.
    from worker.benchmarks.lens import BenchModel, bench_model, environment, format_table, random_imagenet_vit
    from worker.runtime import default_device, load

    device = default_device()
    loaded = load(resolve(open_catalog(settings), reference), device)
    subjects = [BenchModel(loaded.entry.reference, loaded.model, loaded.labels, loaded.ref)]
    if not options["no_vit_base"]:
        subjects.append(random_imagenet_vit("vit_base_patch16_224"))
    records = []
    for subject in subjects:
        for batch in options["batches"]:
            click.echo(f"measuring {subject.label} at batch {batch} ...", err=True)
            records.append(
                bench_model(subject, batch, device, repeats=options["repeats"], with_ig=not options["no_ig"])
            )
    click.echo(format_table(records))
    out: Path = options["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "lens": records}, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)
