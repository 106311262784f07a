"""What the API can tell about a model from its manifest alone (no torch): depth, grid, tokens, pooling.

The layers and grid let the API validate requests (``layers=all``, an analysis' region) and
describe models before any worker has loaded one. They come from the manifest's
``structure``, which registration reads from the built model. Older manifests have none;
for them the figures are guessed from ``model_args`` (``img_size``, ``patch_size``,
``depth``, ``class_token``, ``reg_tokens``, ``global_pool``) and timm's naming convention
(``vit_tiny_patch16_224``), and ``structure_source`` says so. What neither says is ``None``:
the worker, which builds the model, then checks the request itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from model_store.catalog import Catalog, ModelEntry
from model_store.manifest import Manifest


@dataclass(frozen=True)
class ModelInfo:
    grid: tuple[int, int] | None
    layers: int | None
    patch_size: tuple[int, int] | None = None
    prefix_tokens: tuple[str, ...] | None = None
    pooling: str | None = None
    family: str | None = None
    # "manifest": from its structure; "guessed": from model_args and the architecture's name.
    source: Literal["manifest", "guessed"] = "guessed"


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def _count(value: Any, default: int | None = None) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


def _guess(manifest: Manifest) -> ModelInfo:
    """What ``model_args`` and timm's defaults say of a ViT; None for anything they leave open."""
    args = manifest.model_args
    image = _pair(args.get("img_size")) or (manifest.input.height, manifest.input.width)
    patch = _pair(args.get("patch_size"))
    if patch is None and (match := re.search(r"patch(\d+)", manifest.architecture)):
        patch = _pair(int(match.group(1)))
    grid = (image[0] // patch[0], image[1] // patch[1]) if patch else None
    depth = _count(args.get("depth"))
    layers = depth if depth else None
    prefix: tuple[str, ...] | None = None
    pooling: str | None = None
    if grid is not None and manifest.framework == "timm":  # a patch model built by timm: its defaults apply
        class_token = args.get("class_token", True) is not False
        distilled = "distilled" in manifest.architecture
        registers = _count(args.get("reg_tokens"), 0) or 0
        prefix = (
            *(["cls"] if class_token else []),
            *(["dist"] if distilled else []),
            *(f"reg{i}" for i in range(registers)),
        )
        pool = args.get("global_pool", "token" if class_token else "avg")
        pooling = pool if isinstance(pool, str) and pool else None
    return ModelInfo(grid=grid, layers=layers, patch_size=patch, prefix_tokens=prefix, pooling=pooling)


def model_info(manifest: Manifest) -> ModelInfo:
    """The model's explained shape: the manifest's ``structure`` when it has one, else the guesses."""
    structure = manifest.structure
    if structure is None:
        return _guess(manifest)
    return ModelInfo(
        grid=structure.grid,
        layers=structure.layers,
        patch_size=structure.patch_size,
        prefix_tokens=structure.prefix_tokens,
        pooling=structure.pooling,
        family=structure.family,
        source="manifest",
    )


def _list(value: tuple[Any, ...] | None) -> list[Any] | None:
    return None if value is None else list(value)


def summary(entry: ModelEntry, catalog: Catalog) -> dict[str, Any]:
    """The catalog row of one model version, as ``GET /v1/models`` lists it."""
    manifest = entry.manifest
    info = model_info(manifest)
    return {
        "name": manifest.name,
        "version": manifest.version,
        "reference": manifest.reference,
        "versions": catalog.versions(manifest.name),
        "disabled": entry.disabled,
        "description": manifest.description,
        "framework": manifest.framework,
        "architecture": manifest.architecture,
        "input": manifest.input.model_dump(mode="json"),
        "preprocessing": manifest.preprocessing.model_dump(mode="json"),
        "classes": manifest.labels.count,
        "weights_sha256": manifest.weights.sha256,
        "grid": _list(info.grid),
        "layers": info.layers,
        "patch_size": _list(info.patch_size),
        "prefix_tokens": _list(info.prefix_tokens),
        "pooling": info.pooling,
        "family": info.family,
        "structure_source": info.source,
    }


def detail(entry: ModelEntry, catalog: Catalog) -> dict[str, Any]:
    """One model version with its labels and measured metrics (and everything :func:`summary` gives)."""
    manifest = entry.manifest
    return {
        **summary(entry, catalog),
        "labels": entry.labels(),
        "metrics": [metric.model_dump(mode="json") for metric in manifest.metrics],
    }
