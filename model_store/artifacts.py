"""Checksums of model artifacts: nothing is loaded unless its size and sha256 match.

Size is compared first (free) so a truncated or swapped file fails fast; the
sha256 is streamed in 1 MiB blocks so large weights do not sit in memory twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from model_store.manifest import Artifact

_BLOCK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact that is missing or differs from its manifest entry."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path, file_format: str, **details: object) -> Artifact:
    """An :class:`Artifact` entry for a file as it is now (for writing manifests)."""
    return Artifact(
        file=path.name, format=file_format, sha256=sha256_of(path), size=path.stat().st_size, details=details
    )


def verified_bytes(folder: Path, artifact: Artifact) -> bytes:
    """The artifact's content, read once and checked as read.

    For loaders that take bytes (onnxruntime does): what is checked is exactly
    what is loaded, so the file cannot change between the check and the load.
    """
    path = folder / artifact.file
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ArtifactError(f"{path}: artifact missing or unreadable: {error}") from error
    if len(data) != artifact.size:
        raise ArtifactError(f"{path}: size {len(data)} bytes, manifest says {artifact.size}; refusing to load it")
    digest = hashlib.sha256(data).hexdigest()
    if digest != artifact.sha256:
        raise ArtifactError(f"{path}: sha256 {digest}, manifest says {artifact.sha256}; refusing to load it")
    return data


def verified_path(folder: Path, artifact: Artifact) -> Path:
    """Return the artifact's path after checking it; raise :class:`ArtifactError` if it differs."""
    path = folder / artifact.file
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact missing")
    size = path.stat().st_size
    if size != artifact.size:
        raise ArtifactError(f"{path}: size {size} bytes, manifest says {artifact.size}; refusing to load it")
    digest = sha256_of(path)
    if digest != artifact.sha256:
        raise ArtifactError(f"{path}: sha256 {digest}, manifest says {artifact.sha256}; refusing to load it")
    return path
