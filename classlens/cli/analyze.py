"""``classlens analyze KIND --model NAME``: a representation analysis, its JSON and its figures.

The images are the first N Fashion-MNIST test images (with their labels) or the given image
files (no labels). Everything is computed by :func:`worker.analyses.run.run_analysis`, the
same entry point the API's worker task calls; docs/analyses.md describes each kind.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args

import click
from pydantic import ValidationError

from classlens.cli.common import open_catalog, resolve
from classlens.core.contract import AnalysisKind, AnalysisRequest, AnalysisResult
from classlens.core.images import ImageError, decode_image
from classlens.core.settings import Settings

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

KINDS: tuple[str, ...] = get_args(AnalysisKind)
DEFAULT_IMAGES = {"cka": 512}  # every other kind: 256
OTHER_IMAGES = 256


def parse_region(value: str | None) -> tuple[int, int, int, int] | None:
    """``"r0,c0,r1,c1"`` (grid cells, end-exclusive) to a tuple."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",")
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise click.BadParameter(f"{value!r} is not four grid indices row0,col0,row1,col1", param_hint="--region")
    row0, col0, row1, col1 = (int(part) for part in parts)
    return row0, col0, row1, col1


def figure_file(kind: str, name: str) -> str:
    """``<kind>_<name>.png`` (``.html`` for the report), without repeating the kind: ``cka.png``, ``probes.png``."""
    stem = kind.replace("-", "_")
    base = name if name == stem or name.startswith(f"{stem}_") else f"{stem}_{name}"
    return base + (".html" if name == "report" else ".png")


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a click progress bar on stderr once the total is known."""
    with ExitStack() as stack:
        bars: list[Any] = []
        done = [0]

        def update(now: int, total: int) -> None:
            if not bars:
                if total <= 0:
                    return
                bars.append(stack.enter_context(click.progressbar(length=total, label=label, file=sys.stderr)))
            bars[0].update(now - done[0])
            done[0] = now

        yield update


def _dataset(count: int) -> tuple[list[Image.Image], np.ndarray]:
    from PIL import Image

    from classlens.core import fashion_mnist

    try:
        images, labels = fashion_mnist.load("test")
    except (OSError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    if count > len(images):
        raise click.UsageError(f"--images {count}: the Fashion-MNIST test set has {len(images)} images")
    return [Image.fromarray(image, mode="L") for image in images[:count]], labels[:count]


def _files(paths: tuple[Path, ...]) -> list[Image.Image]:
    decoded = []
    for path in paths:
        try:
            decoded.append(decode_image(path.read_bytes()))
        except (ImageError, OSError) as error:
            raise click.ClickException(f"cannot read {path}: {error}") from error
    return decoded


@click.command("analyze")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("image_files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "reference", required=True, help="NAME or NAME@VERSION (any registered timm model).")
@click.option("--compare-to", help="A second model: needed by compare, optional for cka (CKA across the two).")
@click.option(
    "--images",
    "count",
    type=click.IntRange(4, 10_000),
    help="Use the first N Fashion-MNIST test images and their labels [default: 512 for cka, else 256].",
)
@click.option("--representation", type=click.Choice(["tokens", "cls", "gap"]), default="tokens", show_default=True)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(4, 512), help="Images per batch.")
@click.option("--region", help="perturb: the grid box r0,c0,r1,c1 (end-exclusive) whose tokens are dropped.")
@click.option("--prefix-rows", type=click.Choice(["drop", "renormalise"]), default="drop", show_default=True)
@click.option("--ridge", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-memories", default=5, show_default=True, type=click.IntRange(1, 50))
@click.option(
    "--agreement",
    type=click.Choice(["normalised", "reference"]),
    default="normalised",
    show_default=True,
    help="memories: key-value agreement convention (reference: the paper's code).",
)
@click.option(
    "--no-cls",
    type=click.Choice(["pre_softmax", "zero_renormalised", "zero"]),
    default="pre_softmax",
    show_default=True,
    help="perturb: how no-CLS attention removes the prefix keys (zero: the paper's code).",
)
@click.option(
    "--layer",
    type=click.IntRange(0, 1000),
    help="token-probes: the layer of the relevance maps (0 = embedding); gradient-parts: the block of the per-head "
    "maps [default: the last block].",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("classlens-analyses"), show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Also print the result as JSON on stdout.")
@click.pass_obj
def analyze_command(
    settings: Settings, kind: str, image_files: tuple[Path, ...], reference: str, **options: Any
) -> None:
    """Run the KIND analysis on IMAGE_FILES or Fashion-MNIST test images; write JSON and figures to --out."""
    try:
        request = AnalysisRequest(
            kind=cast(AnalysisKind, kind),  # click.Choice(KINDS) checked it
            compare_to=options["compare_to"],
            representation=options["representation"],
            batch_size=options["batch_size"],
            prefix_rows=options["prefix_rows"],
            region=parse_region(options["region"]),
            ridge=options["ridge"],
            top_memories=options["top_memories"],
            agreement=options["agreement"],
            no_cls=options["no_cls"],
            layer=options["layer"],
        )
    except ValidationError as error:
        raise click.UsageError(str(error)) from error
    if kind == "compare" and not request.compare_to:
        raise click.UsageError("compare needs --compare-to NAME: the second model of the comparison")
    if image_files and options["count"] is not None:
        raise click.UsageError("give IMAGE_FILES or --images N, not both")

    from model_store.artifacts import ArtifactError
    from worker.analyses.run import AnalysisError, run_analysis
    from worker.model_loader import ModelLoadError
    from worker.runtime import load

    catalog = open_catalog(settings)
    references = [reference] + ([request.compare_to] if request.compare_to else [])
    entries = [resolve(catalog, name) for name in references]
    try:
        models = [load(entry, require_vit=False) for entry in entries]
    except (ArtifactError, ModelLoadError) as error:
        raise click.ClickException(str(error)) from error

    labels = None
    if image_files:
        images = _files(image_files)
    else:
        images, labels = _dataset(options["count"] or DEFAULT_IMAGES.get(kind, OTHER_IMAGES))

    with progress_bar(f"{kind} over {len(images)} images") as progress:
        try:
            outcome = run_analysis(request, models, images, labels, progress)
        except AnalysisError as error:
            raise click.ClickException(str(error)) from error

    out: Path = options["out"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in outcome.figures.items():
        path = out / figure_file(kind, name)
        path.write_bytes(content)
        written.append(path)
    result = AnalysisResult(
        kind=request.kind,
        models=[loaded.ref for loaded in models],
        images=len(images),
        data=outcome.data,
        figures={name: hashlib.sha256(content).hexdigest() for name, content in outcome.figures.items()},
    )
    result_path = out / f"{kind.replace('-', '_')}.json"
    result_path.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
    if options["as_json"]:
        click.echo(json.dumps(result.model_dump(mode="json")))
    click.echo(f"wrote {result_path} and {len(written)} figure(s) to {out}", err=True)
