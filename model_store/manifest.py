"""The manifest of one model version: ``models/<name>/<version>/manifest.yaml``.

Torch-free on purpose: the API process reads manifests to list models and to
validate requests, and it never imports torch. Everything a worker needs to build
the model, preprocess an image and trust the weights is here; a field that is
not in this schema is an error, so that a typo cannot silently change behaviour.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_FILE = "manifest.yaml"
# The artifact role of an ONNX explainer graph (``classlens models export-onnx``); optional.
ONNX_EXPLAINER = "onnx_explainer"
# Names and versions become folder names and URL path segments.
_SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ManifestError(ValueError):
    """A manifest that cannot be read or does not fit the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What the network takes: one image of this size and colour mode."""

    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channels: Literal[1, 3]
    colour_mode: Literal["L", "RGB"]

    @model_validator(mode="after")
    def _mode_matches_channels(self) -> InputSpec:
        if (self.colour_mode == "L") != (self.channels == 1):
            raise ValueError(f"colour_mode {self.colour_mode} does not have {self.channels} channel(s)")
        return self


# PIL's resampling filters, by the names timm's data config uses.
Interpolation = Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
# How the picture is resized before the optional centre crop:
# - "exact": to ``resize`` (height, width), aspect ratio not kept (timm's crop_mode "squash",
#   Hugging Face image processors);
# - "shorter": the shorter edge to ``resize[0]`` (square ``resize``), the longer edge in
#   proportion, truncated (torchvision ``Resize(int)``, timm's default "center" mode);
# - "keep_ratio": both edges divided by one ratio ``max(rh, rw) * longest + min(rh, rw) *
#   (1 - longest)`` of the image to ``resize``, rounded (timm's ``ResizeKeepRatio``: a
#   non-square "center" target with ``longest`` 0, crop_mode "border" with ``longest`` 1).
ResizeMode = Literal["exact", "shorter", "keep_ratio"]


class Preprocessing(_Strict):
    """The model's own eval transform, step by step: what the production model sees.

    The EXIF orientation, when ``exif_orientation`` (the default), then
    colour conversion (``InputSpec.colour_mode``), trim ``trim_border`` pixels from every
    edge, resize (``resize_mode``), centre-crop to ``crop`` (padding with ``crop_fill``
    where the resized picture is smaller, as timm's ``CenterCropOrPad`` and torchvision's
    ``CenterCrop`` do), scale to [0, 1], normalise with ``mean`` and ``std``.
    ``source`` keeps the configuration these steps were derived from (timm's data config:
    ``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``; or a Hugging Face
    ``preprocessor_config.json``), for people; the steps alone decide the tensor.
    """

    resize: tuple[int, int]
    resize_mode: ResizeMode = "exact"
    longest: float = Field(default=0.0, ge=0.0, le=1.0)
    interpolation: Interpolation = "bilinear"
    crop: tuple[int, int] | None = None
    crop_fill: tuple[Annotated[int, Field(ge=0, le=255)], ...] | None = None
    trim_border: int = Field(default=0, ge=0)
    # Turn the picture upright by its EXIF orientation tag before any other step (Pillow's
    # ``ImageOps.exif_transpose``): a phone stores a portrait photo sideways with a tag saying so, and
    # people expect the model to see what their viewer shows. Default on; false feeds the pixels as stored.
    exif_orientation: bool = True
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in std):
            raise ValueError("every std must be positive")
        return std

    @model_validator(mode="after")
    def _steps_fit(self) -> Preprocessing:
        if min(self.resize) < 1 or (self.crop is not None and min(self.crop) < 1):
            raise ValueError("resize and crop sizes must be positive")
        if self.resize_mode != "exact" and self.crop is None:
            raise ValueError(f"resize_mode {self.resize_mode!r} keeps the aspect ratio: a crop must fix the size")
        if self.resize_mode == "shorter" and self.resize[0] != self.resize[1]:
            raise ValueError("resize_mode 'shorter' takes one edge length: resize must be square")
        return self

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the picture these steps end with."""
        return self.crop or self.resize


class LabelsSpec(_Strict):
    file: str = "labels.txt"
    count: int = Field(gt=1)


class Artifact(_Strict):
    """A file of the model version, trusted only if its size and sha256 match."""

    file: str
    format: Literal["safetensors", "pytorch", "onnx"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    # Free-form facts about the artifact (an ONNX file's opset and outputs, say).
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, file: str) -> str:
        if "/" in file or "\\" in file or file in {"", ".", ".."}:
            raise ValueError(f"artifact file must be a plain name inside the version folder, not {file!r}")
        return file


class Metric(_Strict):
    """A measured figure, with what it was measured on and how to measure it again."""

    name: str
    value: float
    dataset: str
    command: str


class Provenance(_Strict):
    data: str
    recipe: str
    seed: int | None = None
    date: date
    licence: str
    notes: str = ""


class Structure(_Strict):
    """The explained shape of a ViT-family model, read from the built model when it was registered.

    Lets the API validate layers and describe a model before any worker loads it.
    """

    family: str = Field(min_length=1, description="the lens adapter that opens the model up")
    layers: int = Field(gt=0)
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    prefix_tokens: tuple[str, ...]
    pooling: str
    width: int = Field(gt=0)
    heads: int = Field(gt=0)


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=_SAFE_NAME)
    version: str = Field(pattern=_SAFE_NAME)
    description: str = ""
    # "timm": ``timm.create_model(architecture, **model_args)``; "transformers": the Hugging Face
    # class named ``architecture`` built from the config ``model_args`` (config.json's content).
    framework: Literal["timm", "transformers", "onnx"]
    architecture: str = Field(min_length=1, description="timm model name, or a transformers model class")
    model_args: dict[str, Any] = Field(default_factory=dict)
    # None for models the lens does not open (a CNN kept for the representation analyses).
    structure: Structure | None = None
    input: InputSpec
    preprocessing: Preprocessing
    labels: LabelsSpec
    artifacts: dict[str, Artifact]
    metrics: list[Metric] = Field(default_factory=list)
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        channels = self.input.channels
        if len(self.preprocessing.mean) != channels or len(self.preprocessing.std) != channels:
            raise ValueError(f"preprocessing mean and std need {channels} value(s), one per input channel")
        fill = self.preprocessing.crop_fill
        if fill is not None and len(fill) != channels:
            raise ValueError(f"preprocessing crop_fill needs {channels} value(s), one per input channel")
        final = self.preprocessing.output_size
        if tuple(final) != (self.input.height, self.input.width):
            raise ValueError(
                f"preprocessing ends at {final[0]}x{final[1]} but the input is {self.input.height}x{self.input.width}"
            )
        if "weights" not in self.artifacts:
            raise ValueError("artifacts must include 'weights'")
        if self.framework != "onnx" and self.artifacts["weights"].format == "onnx":
            raise ValueError(f"a {self.framework} model's weights are safetensors or pytorch, not onnx")
        explainer = self.artifacts.get(ONNX_EXPLAINER)
        if explainer is not None and explainer.format != "onnx":
            raise ValueError(f"the {ONNX_EXPLAINER} artifact is an onnx file, not {explainer.format}")
        return self

    @property
    def reference(self) -> str:
        """``name@version``, the form the catalog resolves."""
        return f"{self.name}@{self.version}"

    @property
    def weights(self) -> Artifact:
        return self.artifacts["weights"]


def read_manifest(path: Path) -> Manifest:
    """Read and validate one manifest file; every failure is a :class:`ManifestError`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ManifestError(f"{path}: cannot read: {error}") from error
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a mapping, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(f"{path}: {describe_validation_error(error)}") from error


def write_manifest(manifest: Manifest, path: Path) -> None:
    data = manifest.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def read_labels(path: Path, count: int) -> list[str]:
    """One label a line; the number of lines must equal the manifest's count."""
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != count:
        raise ManifestError(f"{path}: {len(labels)} labels, but the manifest says {count}")
    if len(set(labels)) != len(labels):
        raise ManifestError(f"{path}: labels must be unique")
    return labels


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "manifest"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key in which version "10" comes after "9" and "1.10" after "1.2"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))
