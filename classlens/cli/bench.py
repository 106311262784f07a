"""``classlens bench``: the lens benchmark (see classlens/bench/lens.py), printed and written as JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import click

from classlens.cli.common import open_catalog, resolve
from classlens.core.settings import Settings


@click.command("bench")
@click.option("--model", "reference", default="fmnist-vit", show_default=True, help="Registered model to measure.")
@click.option(
    "--no-vit-base",
    is_flag=True,
    help="Skip the random-initialised vit_base_patch16_224 (and with it the analyses benchmark, unless "
    "--analyses-only).",
)
@click.option("--no-vit-small", is_flag=True, help="Skip the random-initialised vit_small_patch16_224.")
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 8), show_default=True)
@click.option(
    "--rounds",
    default=7,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Interleaved rounds per thread count (the slow methods run in fewer); min / median / max over them.",
)
@click.option(
    "--threads",
    "thread_counts",
    multiple=True,
    type=click.IntRange(1, 256),
    default=(1, 2),
    show_default=True,
    help="Torch thread counts to measure at (repeatable); every figure is given at each.",
)
@click.option("--no-ig", is_flag=True, help="Skip Captum Integrated Gradients (the slowest method).")
@click.option(
    "--onnx/--no-onnx",
    default=True,
    show_default=True,
    help="Also time onnxruntime's forward pass and explain through the exported explainer graph (the onnx extra).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/lens.json"))
@click.option("--analyses-only", is_flag=True, help="Run only the analyses benchmark (CKA, attention distance).")
@click.option("--no-analyses", is_flag=True, help="Skip the analyses benchmark.")
@click.option(
    "--analyses-images",
    multiple=True,
    type=click.IntRange(4, 100_000),
    default=(256, 512),
    show_default=True,
    help="Image counts of the analyses benchmark (repeatable); memory is compared across them.",
)
@click.option("--analyses-batch", default=32, show_default=True, type=click.IntRange(4, 1024))
@click.option("--analyses-architecture", default="vit_base_patch16_224", show_default=True)
@click.option("--analyses-img-size", default=224, show_default=True, type=click.IntRange(16, 1024))
@click.option("--analyses-rounds", default=1, show_default=True, type=click.IntRange(1, 20))
@click.option(
    "--analyses-out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/analyses.json")
)
@click.pass_obj
def bench_command(settings: Settings, reference: str, **options: Any) -> None:
    """Time forward, explain, gradient map, Grad-CAM and Integrated Gradients as ratios to the forward pass.

    Ratios of process CPU time at each --threads count, min / median / max over interleaved
    rounds, with the rounds taken while other processes loaded the machine counted ("loaded").

    Then the analyses benchmark: full layer x layer CKA and mean attention distance of a random
    vit_base_patch16_224 against the forward passes alone, and peak memory at 256 and 512 images.
    """
    if not options["analyses_only"]:
        _bench_lens(settings, reference, options)
    if options["analyses_only"] or not (options["no_analyses"] or options["no_vit_base"]):
        _bench_analyses(options)


def _say_load(rounds: list[dict[str, Any]]) -> None:
    """Flag figures taken while other processes loaded the machine (the "loaded" column counts those rounds)."""
    from classlens.bench.measure import LOADED_SHARE

    loaded = [reading for reading in rounds if reading["loaded"]]
    if loaded:
        busiest = max(reading["others_share"] for reading in loaded)
        click.echo(
            f"warning: {len(loaded)} of {len(rounds)} rounds ran while other processes used more than "
            f"{LOADED_SHARE:.0%} of the CPUs (up to {busiest:.0%}); each figure's quiet_ratio in the JSON "
            "leaves them out. Rerun on a quieter machine for figures to publish.",
            err=True,
        )


def _bench_analyses(options: dict[str, Any]) -> None:
    from classlens.bench.analyses import bench_analyses, format_table, summary
    from classlens.bench.lens import environment
    from worker.random_models import random_vit
    from worker.runtime import default_device

    device = default_device()
    architecture, size = options["analyses_architecture"], options["analyses_img_size"]
    try:
        model = random_vit(architecture, img_size=size)
    except (RuntimeError, TypeError, ValueError) as error:
        raise click.ClickException(f"cannot build {architecture} at {size}x{size}: {error}") from error
    counts = sorted(set(options["analyses_images"]))
    batch = options["analyses_batch"]
    label = f"{architecture}-random@{size}"
    click.echo(f"measuring analyses of {label}: {counts} images in batches of {batch} ...", err=True)
    threads = tuple(dict.fromkeys(options["thread_counts"]))
    records = bench_analyses(model, counts, batch, device, rounds=options["analyses_rounds"], threads=threads)
    click.echo(format_table(label, records))
    _say_load([reading for record in records for reading in record["rounds"]])
    figures = summary(records)
    for count, ratio in figures["cka_ratio_to_forward"].items():
        distance = figures["attention_distance_ratio_to_forward"][count]
        click.echo(
            f"CKA / forward at {counts[-1]} images, {count} thread(s): {ratio:.2f}x CPU time "
            f"(target <= {figures['cka_target']}x); attention distance / forward: {distance:.2f}x"
        )
    record = {"environment": environment(), "model": label, "device": str(device), "summary": figures}
    out: Path = options["analyses_out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**record, "analyses": records}, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)


def _bench_lens(settings: Settings, reference: str, options: dict[str, Any]) -> None:
    # Through worker.*: the torchvision compatibility step runs before timm is imported.
    from classlens.bench.lens import BenchModel, bench_model, environment, format_table, random_imagenet_vit
    from worker.runtime import default_device, load

    if not options["no_ig"] and importlib.util.find_spec("captum") is None:
        raise click.ClickException(
            "Integrated Gradients needs Captum, in the bench extra: pip install -c constraints.txt -e '.[bench]' "
            "(or pass --no-ig)"
        )
    device = default_device()
    loaded = load(resolve(open_catalog(settings), reference), device)
    subjects = [BenchModel(loaded.entry.reference, loaded.timm_vit, loaded.labels, loaded.ref)]
    if not options["no_vit_small"]:
        subjects.append(random_imagenet_vit("vit_small_patch16_224"))
    if not options["no_vit_base"]:
        subjects.append(random_imagenet_vit("vit_base_patch16_224"))
    records = []
    for subject in subjects:
        for batch in options["batches"]:
            click.echo(f"measuring {subject.label} at batch {batch} ...", err=True)
            records.append(
                bench_model(
                    subject,
                    batch,
                    device,
                    rounds=options["rounds"],
                    threads=tuple(dict.fromkeys(options["thread_counts"])),
                    with_ig=not options["no_ig"],
                    with_onnx=options["onnx"],
                )
            )
    click.echo(format_table(records))
    _say_load([reading for record in records for reading in record["rounds"]])
    out: Path = options["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), "lens": records}, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)


@click.command("bench-memory")
@click.option("--architecture", default="vit_tiny_patch16_224", show_default=True, help="Random ViT explained.")
@click.option("--img-size", default=224, show_default=True, type=click.IntRange(16, 1024))
@click.option("--explanations", default=1000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--every", default=100, show_default=True, type=click.IntRange(1, 1_000_000), help="Sample RSS every N.")
@click.option(
    "--images",
    "image_counts",
    multiple=True,
    type=click.IntRange(4, 100_000),
    default=(128, 256, 512, 1024),
    show_default=True,
    help="Image counts of the analysis peak (repeatable).",
)
@click.option("--batch", default=32, show_default=True, type=click.IntRange(4, 1024))
@click.option("--analysis-architecture", default="vit_tiny_patch16_224", show_default=True)
@click.option("--analysis-img-size", default=112, show_default=True, type=click.IntRange(16, 1024))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench-results/memory.json"))
def bench_memory_command(**options: Any) -> None:
    """Worker RSS over many explanations above the model's forward-pass peak, and CKA's peak over many images.

    Each figure comes from a fresh interpreter at one thread (classlens/bench/memory.py).
    """
    from classlens.bench.lens import environment
    from classlens.bench.memory import bench_memory, format_table

    click.echo("measuring memory (each figure in a fresh interpreter) ...", err=True)
    record = bench_memory(
        options["architecture"],
        options["img_size"],
        options["explanations"],
        options["every"],
        sorted(set(options["image_counts"])),
        options["batch"],
        options["analysis_architecture"],
        options["analysis_img_size"],
    )
    click.echo(format_table(record))
    out: Path = options["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(), **record}, indent=2) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}", err=True)
