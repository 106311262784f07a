"""``classlens models ...``: list, inspect, verify and register models (torch only for ``add``)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from classlens.cli.common import open_catalog, resolve
from classlens.core.settings import Settings
from model_store.artifacts import ArtifactError
from model_store.catalog import ModelEntry, ModelNotFoundError
from model_store.manifest import ManifestError, describe_validation_error


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
        "disabled": entry.disabled,
    }


@click.group()
def models() -> None:
    """List, inspect, verify and register models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--include-disabled", is_flag=True, help="Also list disabled versions (marked as such).")
@click.pass_obj
def models_list(settings: Settings, as_json: bool, include_disabled: bool) -> None:
    """Every registered model version."""
    catalog = open_catalog(settings)
    rows = [_summary(entry) for entry in catalog.listing(include_disabled=include_disabled)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models registered")
        return
    click.echo(f"{'MODEL':<28} {'ARCHITECTURE':<24} {'INPUT':<12} {'CLASSES':>7}  METRICS")
    for row in rows:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in row["metrics"].items())
        reference = f"{row['name']}@{row['version']}" + (" (disabled)" if row["disabled"] else "")
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


@models.command("disable")
@click.argument("reference")
@click.option("--note", default="", help="Why, kept in the version's DISABLED file.")
@click.pass_obj
def models_disable(settings: Settings, reference: str, note: str) -> None:
    """Disable NAME@VERSION: no new requests, its results no longer served; its files stay (see `enable`)."""
    catalog = open_catalog(settings)
    try:
        entry = catalog.disable(reference, note)
    except (ModelNotFoundError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"disabled {entry.reference} ({entry.folder})")


@models.command("enable")
@click.argument("reference")
@click.pass_obj
def models_enable(settings: Settings, reference: str) -> None:
    """Enable a disabled NAME@VERSION again."""
    catalog = open_catalog(settings)
    try:
        entry = catalog.enable(reference)
    except (ModelNotFoundError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"enabled {entry.reference} ({entry.folder})")


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
@click.argument("path", required=False, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--weights",
    "weights_alias",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The same as PATH for a weights file (kept for older scripts).",
)
@click.option("--name", help="Model name (letters, digits, . _ -); default: PATH's folder or file name.")
@click.option("--version", "version", default="1", show_default=True)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text file, one class name a line, in the head's order (default: labels.txt or the config's labels).",
)
@click.option("--architecture", help="timm model name (e.g. vit_small_patch16_224), or the transformers class.")
@click.option("--model-args", help='JSON object merged over the model arguments read, e.g. {"depth": 6}.')
@click.option("--ema", is_flag=True, help="Take a timm train.py checkpoint's EMA weights (state_dict_ema).")
@click.option("--analyses-only", is_flag=True, help="Register a model the lens cannot open, for the analyses only.")
@click.option("--input-size", callback=_pair, help="Network input HEIGHTxWIDTH (default: the model's).")
@click.option("--colour-mode", type=click.Choice(["RGB", "L"]), help="Default: L for one channel, else RGB.")
@click.option("--crop-pct", type=click.FloatRange(min=0, min_open=True), help="timm crop_pct of the eval transform.")
@click.option("--crop-mode", type=click.Choice(["center", "squash", "border"]), help="timm crop_mode.")
@click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]))
@click.option("--mean", callback=_floats, help="Per-channel mean, comma-separated.")
@click.option("--std", callback=_floats, help="Per-channel std, comma-separated.")
@click.option("--resize", callback=_pair, help="Instead of the derived steps: resize to HEIGHTxWIDTH exactly...")
@click.option("--crop", callback=_pair, help="... then centre-crop to HEIGHTxWIDTH.")
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
def models_add(settings: Settings, path: Path | None, weights_alias: Path | None, **options: Any) -> None:
    """Register the model at PATH: a folder saved by timm or transformers, or a weights file.

    \b
    PATH may be
      - a timm folder (timm.models.save_for_hf): config.json + model.safetensors or pytorch_model.bin
      - a transformers folder (save_pretrained of a ViT or DeiT classifier): config.json, weights and
        preprocessor_config.json when the image processor was saved too
      - a state dict (.safetensors, .pth, .pt, .bin), with --architecture
      - a timm train.py checkpoint (.pth.tar); --ema takes its EMA weights
    What the files say is read (architecture, model arguments, labels, preprocessing); the options
    override it. The model is loaded once, strictly, before anything is put in place. See docs/models.md.
    """
    if path is not None and weights_alias is not None:
        raise click.UsageError("give PATH or --weights, not both")
    path = path or weights_alias
    if path is None:
        raise click.UsageError("give the PATH of a model folder or weights file")
    model_args = None
    if options["model_args"] is not None:
        try:
            model_args = json.loads(options["model_args"])
        except json.JSONDecodeError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--model-args") from error
        if not isinstance(model_args, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--model-args")
    name = options["name"] or _default_name(path)
    store = options.pop("store") or settings.user_model_dir
    labels = options.pop("labels")
    options.update(name=name, model_args=model_args)

    from model_store.sources import ModelSources, RegisterOptions

    try:
        from worker.registration import RegistrationError, register
    except ImportError as error:
        raise _without_worker_extra("classlens models add", error) from error

    try:
        register_options = RegisterOptions(**options)
        sources = ModelSources.locate(path, labels=labels)
    except ValidationError as error:
        raise click.ClickException(f"{describe_validation_error(error)}\nnothing was registered") from error
    except ManifestError as error:
        raise click.ClickException(f"{error}\nnothing was registered") from error

    def warn(message: str) -> None:
        click.secho(f"warning: {message}", fg="yellow", err=True)

    try:
        entry = register(sources, register_options, store, warn=warn)
    except RegistrationError as error:
        raise click.ClickException(f"{error}\nnothing was registered") from error
    click.echo(f"registered {entry.reference} in {entry.folder}")
    click.echo(f"read: {entry.manifest.provenance.notes}")


# The worker extra's packages (pyproject.toml): what registering a model loads it with.
_WORKER_PACKAGES = frozenset({"torch", "torchvision", "timm", "safetensors", "numba", "matplotlib", "transformers"})


def _without_worker_extra(command: str, error: ImportError) -> click.ClickException:
    """The CLI error for ``command`` run where a package of the worker extra is missing.

    Any other import error is a bug, not an install to fix, and is raised as it is.
    """
    missing = (error.name or "").partition(".")[0]
    if missing not in _WORKER_PACKAGES:
        raise error
    return click.ClickException(
        f"{command} loads the model with torch and timm, and {missing} is not installed here: "
        "install the worker extra (pip install 'classlens[worker]')"
    )


def _default_name(path: Path) -> str:
    """PATH's folder or file name (without its weights suffix), made a valid model name."""
    from model_store.sources import weights_stem

    stem = path.resolve().name if path.is_dir() else weights_stem(path.name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:64]
    if not name:
        raise click.UsageError(f"cannot make a model name of {path.name!r}: give --name")
    return name


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
    try:
        from worker.lens.vit import UnsupportedModelError
        from worker.model_loader import ModelLoadError
        from worker.onnx_export import ExportError, export_entry
    except ImportError as error:
        if (error.name or "").partition(".")[0] in ("onnx", "onnxruntime"):
            raise click.ClickException(f"{error}: install the onnx extra (pip install 'classlens[onnx]')") from error
        raise _without_worker_extra("classlens models export-onnx", error) from error

    try:
        entry, agreement = export_entry(entry, opset)
    except (UnsupportedModelError, ExportError, ModelLoadError, ManifestError, ArtifactError, OSError) as error:
        raise click.ClickException(f"{error}\nnothing was recorded") from error
    except ImportError as error:
        raise click.ClickException(f"{error}: install the onnx extra (pip install 'classlens[onnx]')") from error
    artifact = entry.manifest.artifacts["onnx_explainer"]
    click.echo(f"verified against torch: {agreement.describe()}")
    click.echo(f"recorded {entry.reference} onnx_explainer: {entry.folder / artifact.file} ({artifact.size} bytes)")
