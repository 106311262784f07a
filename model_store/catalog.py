"""The catalog: every ``<root>/<name>/<version>/manifest.yaml`` under the store roots.

Resolves ``name`` (the newest version) and ``name@version``. Torch-free; the API
lists and validates models with it, the worker resolves what to load with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model_store.artifacts import ArtifactError, describe_file, verified_bytes, verified_path
from model_store.manifest import (
    MANIFEST_FILE,
    Artifact,
    Manifest,
    ManifestError,
    describe_validation_error,
    read_labels,
    read_manifest,
    version_key,
    write_manifest,
)

BUNDLED_ROOT = Path(__file__).resolve().parent / "models"


class ModelNotFoundError(LookupError):
    """No model, or no such version, in the catalog."""


@dataclass(frozen=True)
class ModelEntry:
    """A manifest and the folder it lives in."""

    manifest: Manifest
    folder: Path

    @property
    def reference(self) -> str:
        return self.manifest.reference

    def labels(self) -> list[str]:
        return read_labels(self.folder / self.manifest.labels.file, self.manifest.labels.count)

    def artifact_path(self, role: str = "weights") -> Path:
        """The artifact's path, only after its size and sha256 match the manifest."""
        if role not in self.manifest.artifacts:
            raise ArtifactError(f"{self.reference} has no {role!r} artifact")
        return verified_path(self.folder, self.manifest.artifacts[role])

    def artifact_bytes(self, role: str) -> bytes:
        """The artifact's content, checked against the manifest as it is read (see :func:`verified_bytes`)."""
        if role not in self.manifest.artifacts:
            raise ArtifactError(f"{self.reference} has no {role!r} artifact")
        return verified_bytes(self.folder, self.manifest.artifacts[role])


@dataclass(frozen=True)
class VerifyResult:
    reference: str
    ok: bool
    problems: tuple[str, ...]


class Catalog:
    """Model versions found under one or more store roots (earlier roots win ties)."""

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.entries: dict[tuple[str, str], ModelEntry] = {}
        self.errors: list[str] = []
        for root in roots:
            for path in sorted(root.glob(f"*/*/{MANIFEST_FILE}")):
                try:
                    manifest = read_manifest(path)
                except ManifestError as error:
                    self.errors.append(str(error))
                    continue
                folder = path.parent
                if (manifest.name, manifest.version) != (folder.parent.name, folder.name):
                    where = f"{folder.parent.name}/{folder.name}"
                    self.errors.append(f"{path}: manifest says {manifest.reference}, but the folder is {where}")
                    continue
                self.entries.setdefault((manifest.name, manifest.version), ModelEntry(manifest, folder))

    @classmethod
    def default(cls, extra_roots: list[Path] | None = None) -> Catalog:
        """The user's roots first (so their models can shadow a bundled one), then the bundled demo models."""
        return cls([*(extra_roots or []), BUNDLED_ROOT])

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.entries})

    def versions(self, name: str) -> list[str]:
        return sorted((v for n, v in self.entries if n == name), key=version_key)

    def latest(self) -> list[ModelEntry]:
        """The newest version of every model."""
        return [self.resolve(name) for name in self.names()]

    def resolve(self, reference: str) -> ModelEntry:
        """``name`` gives the newest version; ``name@version`` exactly that one."""
        name, _, version = reference.partition("@")
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; known models: {known}")
        if not version:
            version = versions[-1]
        elif version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {', '.join(versions)}")
        return self.entries[(name, version)]

    def verify(self, reference: str | None = None) -> list[VerifyResult]:
        """Check every artifact's size and sha256, and the labels file, of one model or all."""
        entries = [self.resolve(reference)] if reference else [self.entries[k] for k in sorted(self.entries)]
        results = []
        for entry in entries:
            problems = []
            for role in entry.manifest.artifacts:
                try:
                    entry.artifact_path(role)
                except ArtifactError as error:
                    problems.append(str(error))
            try:
                entry.labels()
            except (OSError, ManifestError) as error:
                problems.append(str(error))
            results.append(VerifyResult(entry.reference, not problems, tuple(problems)))
        return results


def weights_format(path: Path) -> str:
    """``safetensors`` for ``.safetensors``, ``pytorch`` for ``.pt``/``.pth``/``.bin`` checkpoints."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in {".pt", ".pth", ".bin"}:
        return "pytorch"
    raise ManifestError(f"{path.name}: weights must be .safetensors (preferred) or a .pt/.pth/.bin state dict")


def add_model(
    root: Path,
    fields: dict[str, Any],
    weights: Path,
    labels: Path,
    overwrite: bool = False,
    check: Callable[[ModelEntry], object] | None = None,
) -> ModelEntry:
    """Register a user's model under ``root/<name>/<version>/`` and return its entry.

    ``fields`` are the manifest's fields but ``labels`` and ``artifacts``, which
    are taken from the files: the label count from ``labels``, the checksum from
    ``weights``. The manifest is validated before anything is written, and
    ``check`` (e.g. loading the model once) runs on the staged copy before it
    takes the version's place.
    """
    file_format = weights_format(weights)
    label_list = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    artifact = describe_file(weights, file_format)
    stored_name = "model.safetensors" if file_format == "safetensors" else "model.pt"
    try:
        manifest = Manifest.model_validate(
            {
                **fields,
                "labels": {"file": "labels.txt", "count": len(label_list)},
                "artifacts": {"weights": artifact.model_copy(update={"file": stored_name})},
            }
        )
    except ValidationError as error:
        raise ManifestError(describe_validation_error(error)) from error
    folder = root / manifest.name / manifest.version
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; choose another version or pass --overwrite")
    # Write beside the final folder, check, then rename: a failed check leaves
    # nothing behind, and an existing version is replaced only by one that works.
    staging = Path(tempfile.mkdtemp(prefix=f".adding-{manifest.version}-", dir=_mkdirs(folder.parent)))
    try:
        shutil.copyfile(weights, staging / stored_name)
        (staging / "labels.txt").write_text("\n".join(label_list) + "\n", encoding="utf-8")
        write_manifest(manifest, staging / MANIFEST_FILE)
        staged = ModelEntry(read_manifest(staging / MANIFEST_FILE), staging)
        staged.labels()
        staged.artifact_path()
        if check is not None:
            check(staged)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelEntry(read_manifest(folder / MANIFEST_FILE), folder)


def record_artifact(entry: ModelEntry, role: str, artifact: Artifact) -> ModelEntry:
    """Add (or replace) one artifact of a registered version in its manifest, and return the new entry.

    The file must already be in the version's folder. The manifest is validated,
    written beside the old one and renamed over it, so a reader sees the old
    manifest or the new one, never half of one.
    """
    artifacts = {**entry.manifest.artifacts, role: artifact}
    try:
        manifest = Manifest.model_validate({**entry.manifest.model_dump(), "artifacts": artifacts})
    except ValidationError as error:
        raise ManifestError(describe_validation_error(error)) from error
    verified_path(entry.folder, manifest.artifacts[role])
    handle, staged = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", dir=entry.folder)
    os.close(handle)
    try:
        write_manifest(manifest, Path(staged))
        read_manifest(Path(staged))
        os.replace(staged, entry.folder / MANIFEST_FILE)
    finally:
        Path(staged).unlink(missing_ok=True)
    return ModelEntry(read_manifest(entry.folder / MANIFEST_FILE), entry.folder)


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
