"""What a user hands over to register a model: its files (:class:`ModelSources`) and choices (:class:`RegisterOptions`).

Torch-free on purpose: the API process validates uploads with these before a worker
ever sees them, and it never imports torch, timm or transformers. The worker's
``worker.registration.register`` reads the files; nothing here deserialises weights.

A model arrives as people already have it: a folder written by timm's ``save_for_hf``
or transformers' ``save_pretrained`` (``config.json`` beside the weights), a plain
state dict, or a timm ``train.py`` checkpoint. :meth:`ModelSources.locate` finds the
files in such a folder by the names those libraries write, so that one path is
enough.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_store.manifest import _SAFE_NAME, Interpolation, ManifestError

CONFIG_FILE = "config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
LABELS_FILE = "labels.txt"
# The weights file names save_for_hf and save_pretrained write, in order of preference
# (save_for_hf(..., safe_serialization="both") writes both: safetensors never runs code).
PREFERRED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Longest first, so that "x.pth.tar" is a timm train.py checkpoint, not an unknown ".tar".
WEIGHTS_SUFFIXES = (".pth.tar", ".safetensors", ".bin", ".pth", ".pt")
# A checkpoint split over several files (transformers' max_shard_size) and its index.
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$|\.index\.json$")


class RegistrationError(ValueError):
    """Something about the model's files or options that the user can fix; the message says what and why.

    Raised by the worker's registration (``worker.registration.register``); defined here, torch-free,
    so that every side names the same error.
    """


def weights_suffix(name: str) -> str | None:
    """The weights suffix ``name`` ends with (lower case), or None when it is not a weights file name."""
    lowered = name.lower()
    return next((suffix for suffix in WEIGHTS_SUFFIXES if lowered.endswith(suffix)), None)


def weights_stem(name: str) -> str:
    """``name`` without its weights suffix: ``last.pth.tar`` -> ``last``."""
    suffix = weights_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


@dataclass(frozen=True)
class ModelSources:
    """The files of one model to register; only ``weights`` is required."""

    weights: Path
    config: Path | None = None  # config.json (timm save_for_hf or transformers save_pretrained)
    preprocessor_config: Path | None = None  # preprocessor_config.json (transformers)
    labels: Path | None = None  # labels.txt, one class name a line

    @classmethod
    def locate(cls, path: Path, labels: Path | None = None) -> ModelSources:
        """The files at ``path``: a folder as timm or transformers save one, or a weights file on its own.

        In a folder: ``model.safetensors``, else ``pytorch_model.bin``, else its one weights
        file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``, ``.pth.tar``), and ``config.json``,
        ``preprocessor_config.json`` and ``labels.txt`` where they exist. A weights file given on
        its own brings nothing else with it: its neighbours may belong to another model, so the
        labels come from ``labels`` (and the rest from the options). ``labels`` wins over a
        folder's ``labels.txt``. Raises :class:`ManifestError` for a path with no weights, or
        with several and nothing to choose between them.
        """
        if labels is not None and not labels.is_file():
            raise ManifestError(f"{labels}: no such labels file")
        if path.is_file():
            if weights_suffix(path.name) is None:
                raise ManifestError(f"{path.name}: not a weights file; expected {_suffix_list()}")
            return cls(weights=path, labels=labels)
        if not path.is_dir():
            raise ManifestError(f"{path}: no such file or folder")
        return cls(
            weights=_weights_in(path),
            config=_optional(path / CONFIG_FILE),
            preprocessor_config=_optional(path / PREPROCESSOR_CONFIG_FILE),
            labels=labels or _optional(path / LABELS_FILE),
        )


def _weights_in(folder: Path) -> Path:
    for name in PREFERRED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if any(_SHARD.search(p.name) for p in files):
        raise ManifestError(
            f"{folder}: the weights are split into shards; save them as one file "
            "(save_pretrained(..., max_shard_size='100GB')) and register that"
        )
    found = [p for p in files if weights_suffix(p.name) is not None]
    if not found:
        looked = f"{', '.join(PREFERRED_WEIGHTS)} or one {_suffix_list()} file"
        raise ManifestError(f"{folder}: no weights file (looked for {looked})")
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ManifestError(f"{folder}: several weights files ({names}); give the path of the one to register")
    return found[0]


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def _suffix_list() -> str:
    return "/".join(WEIGHTS_SUFFIXES)


Pair = tuple[int, int]


class RegisterOptions(BaseModel):
    """What the user says about the model; everything but ``name`` is read from the files when left out.

    Set fields override what the files say: ``architecture`` and ``model_args`` (merged over
    those of ``config.json`` or of the checkpoint's training arguments), the timm data config's
    ``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean`` and ``std``, and an
    explicit ``resize`` (exact, aspect ratio not kept) with an optional centre ``crop``, which
    replaces the derived resize and crop altogether. ``ema`` takes a timm ``train.py``
    checkpoint's EMA weights; ``analyses_only`` registers a model the lens cannot open (a CNN)
    for the representation analyses.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Checked here too (the manifest checks them again) because they name folders before a manifest exists.
    name: str = Field(pattern=_SAFE_NAME)
    version: str = Field(default="1", pattern=_SAFE_NAME)
    architecture: str | None = None
    model_args: dict[str, Any] | None = None
    input_size: Pair | None = None
    colour_mode: Literal["RGB", "L"] | None = None
    resize: Pair | None = None
    crop: Pair | None = None
    crop_pct: float | None = Field(default=None, gt=0)
    crop_mode: Literal["center", "squash", "border"] | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    ema: bool = False
    analyses_only: bool = False
    description: str = ""
    data: str = "unknown"
    licence: str = "unknown"
    overwrite: bool = False

    @field_validator("input_size", "resize", "crop")
    @classmethod
    def _positive(cls, value: Pair | None) -> Pair | None:
        if value is not None and min(value) < 1:
            raise ValueError("sizes are HEIGHTxWIDTH in whole pixels, both at least 1")
        return value

    @field_validator("interpolation")
    @classmethod
    def _known_interpolation(cls, value: str | None) -> str | None:
        names = get_args(Interpolation)
        if value is not None and value not in names:
            raise ValueError(f"interpolation {value!r} is not one of {', '.join(names)}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _some_values(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and len(value) not in (1, 3):
            raise ValueError("give one value per input channel (1 or 3)")
        return value
