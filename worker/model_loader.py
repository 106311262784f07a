"""Build a registered model from its manifest, only from verified weights.

The weights file's size and sha256 are checked against the manifest before a
single byte is deserialised (:meth:`model_store.catalog.ModelEntry.artifact_path`).
safetensors is preferred; a PyTorch checkpoint is read only with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from model_store.catalog import ModelEntry
from model_store.manifest import Manifest


class ModelLoadError(RuntimeError):
    """The weights do not fit the architecture, or the model cannot be built."""


def read_state_dict(path: Path, file_format: str) -> dict[str, torch.Tensor]:
    if file_format == "safetensors":
        return load_file(str(path), device="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"{path.name}: not a state dict of tensors")
    return checkpoint


def create_architecture(manifest: Manifest) -> torch.nn.Module:
    """The manifest's timm architecture with its arguments, randomly initialised."""
    if manifest.framework != "timm":
        raise ModelLoadError(f"{manifest.reference}: framework {manifest.framework!r} is not built with timm")
    try:
        return timm.create_model(manifest.architecture, pretrained=False, **manifest.model_args)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ModelLoadError(f"{manifest.reference}: timm cannot build {manifest.architecture!r}: {error}") from error


def load_model(entry: ModelEntry, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model in eval mode with its verified weights; strict about every key and shape."""
    path = entry.artifact_path("weights")
    state = read_state_dict(path, entry.manifest.weights.format)
    model = create_architecture(entry.manifest)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{entry.reference}: weights do not fit {entry.manifest.architecture}: {error}") from error
    classes = getattr(model, "num_classes", None)
    if classes != entry.manifest.labels.count:
        raise ModelLoadError(
            f"{entry.reference}: the model has {classes} classes but {entry.manifest.labels.count} labels"
        )
    return model.eval().to(device)
