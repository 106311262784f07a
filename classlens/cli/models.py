"""``classlens models ...``: list, inspect, verify and register models (torch only for ``add``)."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

import click

from classlens.cli.common import open_catalog, resolve
from classlens.settings import Settings
from model_store.artifacts import ArtifactError
from model_store.catalog import ModelEntry, add_model
from model_store.manifest import ManifestError


def _summary(entry: ModelEntry) -> dict[str, Any]:
    manifest = entry.manifest
    return {
        "name": manifest.name,
        "version": manifest.version,
        "architecture": manifest.architecture,
        "input": f"{manifest.input.height}x{manifest.input.width} {manifest.input.colour_mode}",
        "classes": manifest.labels.count,
        "metrics": {m.name: m.value for m in manifest.metrics},
        "folder": str(entry.folder),
    }


@click.group()
def models() -> None:
    """List, inspect, verify and register models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def models_list(settings: Settings, as_json: bool) -> None:
    """Every registered model version."""
    catalog = open_catalog(settings)
    rows = [_summary(catalog.entries[key]) for key in sorted(catalog.entries)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models registered")
        return
    click.echo(f"{'MODEL':<28} {'ARCHITECTURE':<24} {'INPUT':<12} {'CLASSES':>7}  METRICS")
    for row in rows:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in row["metrics"].items())
        reference = f"{row['name']}@{row['version']}"
        click.echo(f"{reference:<28} {row['architecture']:<24} {row['input']:<12} {row['classes']:>7}  {metrics}")


@models.command("show")
@click.argument("reference")
@click.pass_obj
def models_show(settings: Settings, reference: str) -> None:
    """The full manifest and labels of NAME or NAME@VERSION, as JSON."""
    entry = resolve(open_catalog(settings), reference)
    document = entry.manifest.model_dump(mode="json")
    document["folder"] = str(entry.folder)
    document["label_names"] = entry.labels()
    click.echo(json.dumps(document, indent=2))


@models.command("verify")
@click.argument("reference", required=False)
@click.pass_obj
def models_verify(settings: Settings, reference: str | None) -> None:
    """Check the size and sha256 of every artifact (of NAME, or of all models)."""
    catalog = open_catalog(settings)
    if reference:
        resolve(catalog, reference)
    results = catalog.verify(reference)
    for result in results:
        if result.ok:
            click.echo(f"ok      {result.reference}")
        else:
            click.secho(f"FAILED  {result.reference}", fg="red")
            for problem in result.problems:
                click.echo(f"        {problem}")
    if not results:
        raise click.ClickException("no models registered")
    if not all(result.ok for result in results):
        sys.exit(1)


def _pair(_: click.Context, __: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        height, width = (int(part) for part in value.lower().split("x"))
    except ValueError as error:
        raise click.BadParameter(f"{value!r} is not HEIGHTxWIDTH, e.g. 224x224") from error
    return height, width


def _floats(_: click.Context, __: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError as error:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from error


@models.command("add")
@click.option("--name", required=True, help="Model name (letters, digits, . _ -).")
@click.option("--version", "version", default="1", show_default=True)
@click.option("--architecture", required=True, help="timm model name, e.g. vit_small_patch16_224.")
@click.option(
    "--model-args", default="{}", help='JSON object of timm.create_model arguments, e.g. {"num_classes": 10}.'
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="State dict: .safetensors (preferred) or .pt/.pth (read with weights_only=True).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Text file, one class name a line, in the head's order.",
)
@click.option("--input-size", callback=_pair, required=True, help="Network input HEIGHTxWIDTH.")
@click.option("--colour-mode", type=click.Choice(["RGB", "L"]), default="RGB", show_default=True)
@click.option("--resize", callback=_pair, help="Resize to HEIGHTxWIDTH first (default: the input size).")
@click.option("--crop", callback=_pair, help="Then centre-crop to HEIGHTxWIDTH.")
@click.option(
    "--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic"]), default="bicubic", show_default=True
)
@click.option("--mean", callback=_floats, help="Per-channel mean (default: ImageNet's).")
@click.option("--std", callback=_floats, help="Per-channel std (default: ImageNet's).")
@click.option("--description", default="")
@click.option("--data", default="unknown", help="What the weights were trained on.")
@click.option("--licence", default="unknown")
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="Store root (default: CLASSLENS_MODEL_DIRS' first or CLASSLENS_DATA_DIR/models).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing version.")
@click.pass_obj
def models_add(settings: Settings, **options: Any) -> None:
    """Register your own timm checkpoint: write its folder and manifest, then load it once to prove it fits."""
    try:
        model_args = json.loads(options["model_args"])
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint="--model-args") from error
    if not isinstance(model_args, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--model-args")
    channels = 1 if options["colour_mode"] == "L" else 3
    default_mean, default_std = ((0.5,), (0.5,)) if channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    height, width = options["input_size"]
    fields = {
        "name": options["name"],
        "version": options["version"],
        "description": options["description"],
        "framework": "timm",
        "architecture": options["architecture"],
        "model_args": model_args,
        "input": {"height": height, "width": width, "channels": channels, "colour_mode": options["colour_mode"]},
        "preprocessing": {
            "resize": options["resize"] or (height, width),
            "interpolation": options["interpolation"],
            "crop": options["crop"],
            "mean": options["mean"] or default_mean,
            "std": options["std"] or default_std,
        },
        "provenance": {
            "data": options["data"],
            "recipe": "registered with classlens models add",
            "date": date.today().isoformat(),
            "licence": options["licence"],
        },
    }
    root = options["store"] or settings.user_model_dir
    from worker.model_loader import ModelLoadError, load_model

    try:
        entry = add_model(
            root, fields, options["weights"], options["labels"], overwrite=options["overwrite"], check=load_model
        )
    except (ManifestError, ArtifactError, ModelLoadError, FileExistsError, OSError) as error:
        raise click.ClickException(f"{error}\nnothing was registered") from error
    click.echo(f"registered {entry.reference} in {entry.folder}")


@models.command("export-onnx")
@click.argument("reference")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.pass_obj
def models_export_onnx(settings: Settings, reference: str, opset: int) -> None:
    """Export NAME[@VERSION]'s explainer graph (logits and every block's streams) to ONNX.

    Writes explainer.onnx into the model's folder and records it in the manifest,
    but only after onnxruntime reproduces torch on sample images; workers then
    explain with onnxruntime when the request needs no gradient map.
    """
    entry = resolve(open_catalog(settings), reference)
    from worker.lens.vit import UnsupportedModelError
    from worker.model_loader import ModelLoadError
    from worker.onnx_export import ExportError, export_entry

    try:
        entry, agreement = export_entry(entry, opset)
    except (UnsupportedModelError, ExportError, ModelLoadError, ManifestError, ArtifactError, OSError) as error:
        raise click.ClickException(f"{error}\nnothing was recorded") from error
    except ImportError as error:
        raise click.ClickException(f"{error}: install the onnx extra (pip install 'classlens[onnx]')") from error
    artifact = entry.manifest.artifacts["onnx_explainer"]
    click.echo(f"verified against torch: {agreement.describe()}")
    click.echo(f"recorded {entry.reference} onnx_explainer: {entry.folder / artifact.file} ({artifact.size} bytes)")
