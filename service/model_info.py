"""What the API can tell about a model from its manifest alone (no torch): patch grid and depth.

The grid and the number of blocks let the API validate layers and describe results before
any worker has loaded the model. They come from ``model_args`` (``img_size``,
``patch_size``, ``depth``); the patch size falls back on timm's naming convention
(``vit_tiny_patch16_224``). What the manifest does not say is ``None``: the worker,
which builds the model, then checks the request itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from model_store.catalog import Catalog, ModelEntry
from model_store.manifest import Manifest


@dataclass(frozen=True)
class ModelInfo:
    grid: tuple[int, int] | None
    layers: int | None


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def model_info(manifest: Manifest) -> ModelInfo:
    args = manifest.model_args
    image = _pair(args.get("img_size")) or (manifest.input.height, manifest.input.width)
    patch = _pair(args.get("patch_size"))
    if patch is None and (match := re.search(r"patch(\d+)", manifest.architecture)):
        patch = _pair(int(match.group(1)))
    grid = (image[0] // patch[0], image[1] // patch[1]) if patch else None
    depth = args.get("depth")
    layers = depth if isinstance(depth, int) and not isinstance(depth, bool) and depth > 0 else None
    return ModelInfo(grid=grid, layers=layers)


def summary(entry: ModelEntry, catalog: Catalog) -> dict[str, Any]:
    """The catalog row of one model version, as ``GET /v1/models`` lists it."""
    manifest = entry.manifest
    info = model_info(manifest)
    return {
        "name": manifest.name,
        "version": manifest.version,
        "reference": manifest.reference,
        "versions": catalog.versions(manifest.name),
        "description": manifest.description,
        "architecture": manifest.architecture,
        "input": manifest.input.model_dump(mode="json"),
        "classes": manifest.labels.count,
        "weights_sha256": manifest.weights.sha256,
        "grid": list(info.grid) if info.grid else None,
        "layers": info.layers,
    }


def detail(entry: ModelEntry, catalog: Catalog) -> dict[str, Any]:
    """One model version with its labels, preprocessing and measured metrics."""
    manifest = entry.manifest
    return {
        **summary(entry, catalog),
        "labels": entry.labels(),
        "preprocessing": manifest.preprocessing.model_dump(mode="json"),
        "metrics": [metric.model_dump(mode="json") for metric in manifest.metrics],
    }
