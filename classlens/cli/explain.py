"""``classlens explain IMAGE... --model NAME``: result JSON and PNG overlays for each image."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from classlens.cli.common import open_catalog, resolve
from classlens.core.contract import BASELINE_MAPS, BASELINE_TITLES, Explanation
from classlens.core.images import ImageError, decode_image
from classlens.core.render import render_grid, render_overlay
from classlens.core.requests import RequestError, canonical_request, is_index, parse_class
from classlens.core.settings import Settings
from model_store.manifest import Preprocessing

if TYPE_CHECKING:
    from PIL import Image


def _file_part(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "class"


def write_figures(
    image: Image.Image, result: Explanation, out: Path, stem: str, preprocessing: Preprocessing | None = None
) -> list[Path]:
    """One overlay per target at the last requested layer, a grid when there are several layers, the gradient
    map and each baseline map.

    ``image`` is the picture the model saw (after resize and crop); with ``preprocessing`` each figure says so.
    """
    written = []
    for target in result.targets:
        name = f"{stem}_{target.index}-{_file_part(target.label)}"
        layers = list(target.projection_maps)
        last = layers[-1]
        overlay = render_overlay(
            image,
            _array(target.projection_maps[last]),
            title=f"{target.label}: {result.map_kind} at layer {last} of {result.layers} (p={target.probability:.3f})",
            preprocessing=preprocessing,
        )
        written.append(out / f"{name}.png")
        overlay.save(written[-1])
        if len(layers) > 1:
            grid = render_grid(
                image,
                [_array(target.projection_maps[layer]) for layer in layers],
                [f"layer {layer}" for layer in layers],
                suptitle=f"{target.label}: {result.map_kind} per layer (one scale)",
                preprocessing=preprocessing,
            )
            written.append(out / f"{name}_layers.png")
            grid.save(written[-1])
        if target.gradient_map is not None:
            gradient = render_overlay(
                image,
                _array(target.gradient_map),
                title=f"{target.label}: gradient relevance",
                colormap="RdBu_r",
                preprocessing=preprocessing,
            )
            written.append(out / f"{name}_gradient.png")
            gradient.save(written[-1])
        for method, values in (target.baseline_maps or {}).items():
            baseline = render_overlay(
                image,
                _array(values),
                title=f"{target.label}: {BASELINE_TITLES[method]}",
                preprocessing=preprocessing,
            )
            written.append(out / f"{name}_{method}.png")
            baseline.save(written[-1])
    return written


def _array(values: list[list[float]]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.float32)


@click.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "reference", required=True, help="NAME or NAME@VERSION.")
@click.option("--target", "targets", multiple=True, help="Class index or label name (repeat for several).")
@click.option("--top-k", default=3, show_default=True, help="Explain the top-k predictions when no --target is given.")
@click.option("--layer", "layers", multiple=True, help="Layer of the projection maps, 0..L, or 'all' (repeatable).")
@click.option("--map-kind", type=click.Choice(["identifiability", "logit", "probability"]), default="identifiability")
@click.option("--gradient-map", is_flag=True, help="Also compute the gradient relevance map.")
@click.option(
    "--baseline-map",
    "baseline_maps",
    multiple=True,
    type=click.Choice(BASELINE_MAPS),
    help="Also compute this method's map (repeatable): Chefer et al. 2021, attention rollout, Grad-CAM.",
)
@click.option("--no-sublayers", is_flag=True, help="Skip the attention and MLP sublayer ranks.")
@click.option("--norm", type=click.Choice(["fresh", "cached"]), default="fresh", show_default=True)
@click.option("--no-bias", is_flag=True, help="Project without the head bias.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("classlens-out"), show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Also print the results as JSON on stdout.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 512))
@click.pass_obj
def explain_command(settings: Settings, images: tuple[Path, ...], reference: str, **options: Any) -> None:
    """Explain IMAGE(s) with a registered model: writes DIR/<image>.json and PNG overlays."""
    from worker.lens.explain import ExplainError
    from worker.lens.vit import UnsupportedModelError
    from worker.runtime import load

    entry = resolve(open_catalog(settings), reference)
    try:
        model = load(entry, onnx=settings.onnx)
    except UnsupportedModelError as error:
        raise click.ClickException(f"{entry.reference}: {error}") from error
    depth = model.spec.depth
    fields = {
        "targets": [parse_class(target) for target in options["targets"]],
        "top_k": options["top_k"],
        "layers": _parse_layers(options["layers"], depth) or None,
        "map_kind": options["map_kind"],
        "sublayers": not options["no_sublayers"],
        "gradient_map": options["gradient_map"],
        "baseline_maps": list(options["baseline_maps"]),
        "norm": options["norm"],
        "bias": not options["no_bias"],
    }
    try:  # the rules a request to the API follows, so that the same options mean the same explanation
        request = canonical_request(fields, model.labels, depth)
    except RequestError as error:
        raise click.ClickException(str(error)) from error

    out: Path = options["out"]
    out.mkdir(parents=True, exist_ok=True)
    decoded: list[tuple[Path, Image.Image]] = []
    failures = 0
    for path in images:
        try:
            decoded.append((path, decode_image(path.read_bytes())))
        except (ImageError, OSError) as error:
            failures += 1
            click.secho(f"skipped {path}: {error}", fg="red", err=True)

    results = []
    batch_size = options["batch_size"]
    with click.progressbar(length=len(decoded), label="explaining", file=sys.stderr) as progress:
        for start in range(0, len(decoded), batch_size):
            batch = decoded[start : start + batch_size]
            try:
                explanations = model.explain([image for _, image in batch], request)
            except ExplainError as error:
                raise click.ClickException(str(error)) from error
            for (path, image), result in zip(batch, explanations, strict=True):
                (out / f"{path.stem}.json").write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
                write_figures(model.as_seen(image), result, out, path.stem, model.entry.manifest.preprocessing)
                results.append({"image": str(path), **result.model_dump(mode="json")})
            progress.update(len(batch))
    if options["as_json"]:
        click.echo(json.dumps(results))
    click.echo(f"wrote {len(results)} explanation(s) to {out}", err=True)
    if failures:
        raise click.ClickException(f"{failures} image(s) could not be read")


def _parse_layers(values: tuple[str, ...], depth: int) -> list[int]:
    """The ``--layer`` options as numbers (``all``: every layer); their range is the request rules' to check."""
    layers: list[int] = []
    for value in values:
        text = value.strip()
        if text == "all":
            layers.extend(range(depth + 1))
        elif is_index(text.removeprefix("-")):
            layers.append(int(text))
        else:
            raise click.BadParameter(f"{value!r} is not a layer number or 'all'", param_hint="--layer")
    return layers
