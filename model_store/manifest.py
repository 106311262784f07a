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
from typing import Any, Literal

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


class Preprocessing(_Strict):
    """Resize to ``resize`` (height, width), centre-crop to ``crop``, scale to [0, 1], normalise."""

    resize: tuple[int, int]
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in std):
            raise ValueError("every std must be positive")
        return std


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


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=_SAFE_NAME)
    version: str = Field(pattern=_SAFE_NAME)
    description: str = ""
    framework: Literal["timm", "onnx"]
    architecture: str = Field(min_length=1, description="timm model name given to timm.create_model")
    model_args: dict[str, Any] = Field(default_factory=dict)
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
        final = self.preprocessing.crop or self.preprocessing.resize
        if tuple(final) != (self.input.height, self.input.width):
            raise ValueError(
                f"preprocessing ends at {final[0]}x{final[1]} but the input is {self.input.height}x{self.input.width}"
            )
        if "weights" not in self.artifacts:
            raise ValueError("artifacts must include 'weights'")
        if self.framework == "timm" and self.artifacts["weights"].format == "onnx":
            raise ValueError("a timm model's weights are safetensors or pytorch, not onnx")
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
