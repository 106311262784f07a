"""Build a registered model from its manifest, only from verified weights.

The weights file's size and sha256 are checked against the manifest before a
single byte is deserialised (:meth:`model_store.catalog.ModelEntry.artifact_path`).
safetensors is preferred; a PyTorch checkpoint is read only with
``torch.load(weights_only=True)``, which refuses pickled code.

Two frameworks build models: timm (``timm.create_model(architecture, **model_args)``)
and Hugging Face transformers, for the ViT and DeiT image classifiers only
(:data:`TRANSFORMERS_CLASSES`), built from their config with eager attention so that
the lens can read the attention probabilities. Loading is strict for both: every key
and every shape, with a short account of what does not fit (:class:`Fit`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from model_store.catalog import ModelEntry
from model_store.manifest import Manifest

# The transformers classes the lens explains: pre-norm ViT encoders with a linear head.
TRANSFORMERS_CLASSES = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)
# How many keys of each kind an error names: enough to recognise the pattern, never a key dump.
SHOWN_KEYS = 5

Shape = tuple[int, ...]


class ModelLoadError(RuntimeError):
    """The weights do not fit the architecture, or the model cannot be built."""


def read_checkpoint(path: Path) -> object:
    """A PyTorch checkpoint's content, unpickled with ``weights_only=True``.

    timm's ``train.py`` saves its command-line arguments in the checkpoint as an
    ``argparse.Namespace``, which ``weights_only`` refuses like any other class. A
    Namespace is a plain attribute bag whose unpickling runs no code of the file's
    choosing (it is rebuilt from a dict of the values weights_only already accepts),
    so exactly that one class is allowed; anything else still fails to load.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Path, file_format: str) -> dict[str, torch.Tensor]:
    """The tensors of a stored weights file (a registered version's, already verified)."""
    if file_format == "safetensors":
        return load_file(str(path), device="cpu")
    checkpoint = read_checkpoint(path)
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"{path.name}: not a state dict of tensors")
    return checkpoint


@dataclass(frozen=True)
class Fit:
    """How a state dict fits a model: keys the model has and the file lacks, the reverse, and shapes that differ.

    Key lists are in the model's order (missing) and the file's (unexpected), so the first
    few named in a message are the first a reader would look for.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # (key, in the file, in the model)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One sentence per kind of problem: its count and at most :data:`SHOWN_KEYS` examples."""
        parts = []
        if self.missing:
            parts.append(f"{_count(self.missing, 'missing key')} ({_first(self.missing)})")
        if self.unexpected:
            parts.append(f"{_count(self.unexpected, 'unexpected key')} ({_first(self.unexpected)})")
        if self.mismatched:
            shapes = [
                f"{key} {_shape(found)} in the file vs {_shape(wanted)}" for key, found, wanted in self.mismatched
            ]
            parts.append(f"{_count(self.mismatched, 'shape mismatch', 'es')} ({_first(shapes)})")
        return "; ".join(parts) if parts else "every key and shape fits"


def _count(items: list[Any], noun: str, plural: str = "s") -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else plural}"


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_KEYS])
    return shown + (f", and {len(items) - SHOWN_KEYS} more" if len(items) > SHOWN_KEYS else "")


def _shape(shape: Shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def build_model(framework: str, architecture: str, model_args: Mapping[str, Any]) -> nn.Module:
    """The architecture with its arguments, randomly initialised (no download: ``pretrained=False``)."""
    if framework == "timm":
        try:
            return timm.create_model(architecture, pretrained=False, **model_args)
        except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as error:
            raise ModelLoadError(f"timm cannot build {architecture!r} with {dict(model_args)}: {error}") from error
    if framework == "transformers":
        model_class, config = _transformers_config(architecture, model_args)
        try:
            return model_class(config)  # the config carries attn_implementation="eager"
        except (RuntimeError, TypeError, ValueError) as error:
            raise ModelLoadError(f"transformers cannot build {architecture} from the config: {error}") from error
    raise ModelLoadError(f"framework {framework!r} is not built from weights by the worker")


def create_architecture(manifest: Manifest) -> nn.Module:
    """The manifest's architecture with its arguments, randomly initialised."""
    try:
        return build_model(manifest.framework, manifest.architecture, manifest.model_args)
    except ModelLoadError as error:
        raise ModelLoadError(f"{manifest.reference}: {error}") from error


def transformers_class(architecture: str) -> Any:
    """The transformers class named ``architecture``, from the classes the lens explains only."""
    if architecture not in TRANSFORMERS_CLASSES:
        raise ModelLoadError(
            f"transformers {architecture} is not supported; supported: {', '.join(TRANSFORMERS_CLASSES)}"
        )
    try:
        import transformers
    except ImportError as error:
        raise ModelLoadError(f"{architecture} needs transformers: pip install 'classlens[worker]'") from error
    return getattr(transformers, architecture)


def _transformers_config(architecture: str, model_args: Mapping[str, Any]) -> tuple[Any, Any]:
    """The class and its config from ``model_args`` (a config.json's content), with eager attention.

    The class's own config class builds it, so a config.json of another model type (a DeiT
    config under ``ViTForImageClassification``) is refused rather than half-read.
    """
    model_class = transformers_class(architecture)
    args = dict(model_args)
    config_class = model_class.config_class
    model_type = args.pop("model_type", config_class.model_type)
    if model_type != config_class.model_type:
        raise ModelLoadError(
            f"the config's model_type is {model_type!r}, but {architecture} takes {config_class.model_type!r}"
        )
    for key in ("architectures", "transformers_version", "attn_implementation", "_attn_implementation"):
        args.pop(key, None)
    try:
        return model_class, config_class(**args, attn_implementation="eager")
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"transformers cannot build a {config_class.__name__} from the config: {error}") from error


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for one load: :class:`Fit` says what matters.

    Its verbosity is process-wide; it is restored as it was on leaving.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def fit_weights(
    framework: str, architecture: str, model_args: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> tuple[nn.Module, Fit]:
    """The model built and loaded with ``state`` where it fits, and how it fits (load only if ``Fit.ok``).

    timm: compared key by key with the model's own state dict, then loaded strictly.
    transformers: through ``from_pretrained`` with the state dict, which renames the keys of
    checkpoints saved by other transformers versions as transformers itself does, and reports
    missing, unexpected and mismatched keys instead of raising (they are this :class:`Fit`).
    """
    if framework == "transformers":
        model_class, config = _transformers_config(architecture, model_args)
        try:
            with _quiet_transformers():
                model, info = model_class.from_pretrained(
                    None,
                    config=config,
                    state_dict=dict(state),
                    attn_implementation="eager",
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                )
        except (RuntimeError, OSError, ValueError, TypeError, KeyError) as error:
            raise ModelLoadError(f"transformers cannot load the weights into {architecture}: {error}") from error
        mismatched = sorted((key, tuple(found), tuple(wanted)) for key, found, wanted in info["mismatched_keys"])
        # float32 whatever the config's dtype: the lens computes in float32 (half precision is the runtime's choice).
        return model.float(), Fit(sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), mismatched)
    model = build_model(framework, architecture, model_args)
    expected = model.state_dict()
    fit = Fit(
        missing=[key for key in expected if key not in state],
        unexpected=[key for key in state if key not in expected],
        mismatched=[
            (key, tuple(state[key].shape), tuple(wanted.shape))
            for key, wanted in expected.items()
            if key in state and state[key].shape != wanted.shape
        ],
    )
    if fit.ok:
        model.load_state_dict(dict(state), strict=True)
    return model, fit


def num_classes_of(model: nn.Module) -> int | None:
    """The number of classes of a timm model (``num_classes``) or a transformers one (``config.num_labels``)."""
    classes = getattr(model, "num_classes", None)
    if classes is None and hasattr(model, "config"):
        classes = getattr(model.config, "num_labels", None)
    return int(classes) if isinstance(classes, int) else None


def logits_of(output: Any) -> torch.Tensor:
    """A forward pass's logits: timm returns the tensor, transformers an output object holding it."""
    return output if isinstance(output, torch.Tensor) else output.logits


def load_model(entry: ModelEntry, device: str | torch.device = "cpu") -> nn.Module:
    """The model in eval mode with its verified weights; strict about every key and shape."""
    manifest = entry.manifest
    path = entry.artifact_path("weights")
    state = read_state_dict(path, manifest.weights.format)
    try:
        model, fit = fit_weights(manifest.framework, manifest.architecture, manifest.model_args, state)
    except ModelLoadError as error:
        raise ModelLoadError(f"{entry.reference}: {error}") from error
    if not fit.ok:
        raise ModelLoadError(f"{entry.reference}: weights do not fit {manifest.architecture}: {fit.describe()}")
    classes = num_classes_of(model)
    if classes != manifest.labels.count:
        raise ModelLoadError(f"{entry.reference}: the model has {classes} classes but {manifest.labels.count} labels")
    return model.eval().to(device)
