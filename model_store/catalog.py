"""The catalog: every ``<root>/<name>/<version>/manifest.yaml`` under the store roots.

Resolves ``name`` (the newest version) and ``name@version``. Torch-free; the API
lists and validates models with it, the worker resolves what to load with it.

Models change while the service runs (``classlens models add``, ``POST /v1/models``,
``DELETE /v1/models/{name}@{version}``), so a catalog built with ``refresh_s`` looks again
by itself: at most every ``refresh_s`` seconds it stats the roots' ``*/*/manifest.yaml`` and
``*/*/DISABLED`` files and re-reads the manifests only when that stamp changed, and a
reference it cannot resolve makes it look at once. A version is *disabled* by a ``DISABLED``
file in its folder (written atomically): its files stay, it is not resolved for new work, and
deleting the file enables it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

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
from model_store.sources import weights_suffix

BUNDLED_ROOT = Path(__file__).resolve().parent / "models"
# Sample images of the bundled Fashion-MNIST models (the tests, the demos and the recipes use them).
BUNDLED_SAMPLES = Path(__file__).resolve().parent / "samples" / "fashion-mnist"


# The marker of a disabled version: a file of this name in the version's folder (its text says when and why).
DISABLED_FILE = "DISABLED"


class ModelNotFoundError(LookupError):
    """No model, or no such version, in the catalog."""


class ModelDisabledError(ModelNotFoundError):
    """The version exists but is disabled (a ``DISABLED`` file in its folder): it is not served for new work.

    A :class:`ModelNotFoundError`, so that code which only needs "not available" treats it so (a worker
    fails the job); the API tells the two apart, to say *disabled* rather than *unknown*.
    """


class ModelChangedError(LookupError):
    """The version was registered again (other weights, labels or preprocessing) after the job was submitted.

    The job's content key names the old content, so a result computed now would be stored under a
    key that does not describe it; the job fails instead, and submitting again computes the new one.
    """


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ModelEntry:
    """A manifest and the folder it lives in; ``disabled`` when the folder holds a ``DISABLED`` file."""

    manifest: Manifest
    folder: Path
    disabled: bool = False

    @property
    def reference(self) -> str:
        return self.manifest.reference

    def labels(self) -> list[str]:
        """The labels, read from disk once per entry (every request of a model needs them).

        An entry is the catalog's reading of one manifest: a refresh that finds a model changed makes
        new entries, which read their labels afresh. One reading also keeps the labels and the
        :attr:`result_fingerprint` made from them in agreement.
        """
        return list(self._labels)

    @cached_property
    def _labels(self) -> tuple[str, ...]:
        return tuple(self.labels_on_disk())

    def labels_on_disk(self) -> list[str]:
        """The labels file as it is now (what :meth:`Catalog.verify` checks), not the entry's reading of it."""
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

    def result_fields(self) -> dict[str, Any]:
        """Everything about this version that changes what an explanation, audit or analysis of it contains.

        In: the name and version (every result names its model), the weights (digest and format), the
        labels' text in order (a corrected labelling names other classes), the input, the preprocessing
        steps, the framework, the architecture and its arguments, and the explained ``structure``.
        Out, because no result depends on them: the description, metrics and provenance, the labels
        file's name, the steps' ``source`` (kept for people; the steps alone decide the tensor), and the
        ONNX explainer graph (recorded only once it agrees with torch, and checked against these weights).
        """
        manifest = self.manifest
        return {
            "name": manifest.name,
            "version": manifest.version,
            "framework": manifest.framework,
            "architecture": manifest.architecture,
            "model_args": manifest.model_args,
            "structure": None if manifest.structure is None else manifest.structure.model_dump(mode="json"),
            "input": manifest.input.model_dump(mode="json"),
            "preprocessing": manifest.preprocessing.model_dump(mode="json", exclude={"source"}),
            "weights": {"sha256": manifest.weights.sha256, "format": manifest.weights.format},
            "labels": self.labels(),
        }

    @cached_property
    def result_fingerprint(self) -> str:
        """sha256 of :meth:`result_fields` as canonical JSON: the model's part of every result's content key.

        Computed once per entry, when the catalog reads it (so that it describes the files as they were
        then); the catalog makes new entries whenever a manifest changes.
        """
        return hashlib.sha256(_canonical_json(self.result_fields()).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    reference: str
    ok: bool
    problems: tuple[str, ...]


# What the catalog last saw of its roots: (path, mtime in ns, size, inode) of every manifest and marker.
Stamp = tuple[tuple[str, int, int, int], ...]


class _Snapshot(NamedTuple):
    """One consistent reading of the roots, swapped in whole so that readers never see half of a refresh."""

    entries: dict[tuple[str, str], ModelEntry]
    disabled: dict[tuple[str, str], ModelEntry]
    errors: list[str]
    stamp: Stamp


def _staging(folder: Path) -> bool:
    """A folder being written (``add_model`` stages versions in ``.adding-*`` beside their final place)."""
    return folder.name.startswith(".") or folder.parent.name.startswith(".")


class Catalog:
    """Model versions found under one or more store roots (earlier roots win ties).

    ``refresh_s=None`` (the default) reads the roots once. With a number, the catalog looks again
    by itself, as the module docstring says: what the API and the workers use, so that a model
    added or disabled while they run is seen without a restart. Thread-safe: a refresh swaps in
    a whole new reading.
    """

    def __init__(self, roots: list[Path], *, refresh_s: float | None = None):
        self.roots = roots
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._snapshot = self._scan(self._stamp())

    @classmethod
    def default(cls, extra_roots: list[Path] | None = None, *, refresh_s: float | None = None) -> Catalog:
        """The user's roots first (so their models can shadow a bundled one), then the bundled demo models."""
        return cls([*(extra_roots or []), BUNDLED_ROOT], refresh_s=refresh_s)

    # -- reading the roots ----------------------------------------------------------------------------

    def _stamp(self) -> Stamp:
        """A stat of every manifest and ``DISABLED`` file: cheap, and different after any add, overwrite or disable."""
        found = []
        for root in self.roots:
            for pattern in (f"*/*/{MANIFEST_FILE}", f"*/*/{DISABLED_FILE}"):
                for path in root.glob(pattern):
                    try:
                        stat = path.stat()
                    except OSError:  # removed as we looked: the next look sees it gone
                        continue
                    found.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(sorted(found))

    def _scan(self, stamp: Stamp) -> _Snapshot:
        entries: dict[tuple[str, str], ModelEntry] = {}
        disabled: dict[tuple[str, str], ModelEntry] = {}
        errors: list[str] = []
        for root in self.roots:
            for path in sorted(root.glob(f"*/*/{MANIFEST_FILE}")):
                folder = path.parent
                if _staging(folder):
                    continue
                try:
                    manifest = read_manifest(path)
                except ManifestError as error:
                    errors.append(str(error))
                    continue
                if (manifest.name, manifest.version) != (folder.parent.name, folder.name):
                    where = f"{folder.parent.name}/{folder.name}"
                    errors.append(f"{path}: manifest says {manifest.reference}, but the folder is {where}")
                    continue
                key = (manifest.name, manifest.version)
                if key in entries or key in disabled:  # an earlier root has this version (enabled or not)
                    continue
                off = (folder / DISABLED_FILE).exists()
                entry = ModelEntry(manifest, folder, disabled=off)
                # Now, while the labels are those of this manifest: an entry's fingerprint must not mix
                # its manifest with files written later. Unreadable labels are reported when used.
                with contextlib.suppress(OSError, ManifestError):
                    _ = entry.result_fingerprint
                (disabled if off else entries)[key] = entry
        return _Snapshot(entries, disabled, errors, stamp)

    def refresh(self, *, force: bool = False) -> bool:
        """Look at the roots now; re-read them if anything changed (or ``force``). True when re-read."""
        with self._lock:
            return self._refresh_locked(force)

    def _refresh_locked(self, force: bool) -> bool:
        self._checked = time.monotonic()
        stamp = self._stamp()  # before the scan: a change made during it shows in the next stamp
        if not force and stamp == self._snapshot.stamp:
            return False
        self._snapshot = self._scan(stamp)
        return True

    def _current(self) -> _Snapshot:
        """The latest reading, refreshed first when ``refresh_s`` has passed.

        A thread that finds another one refreshing does not wait for it: it reads the snapshot that
        is there, at most one period old.
        """
        due = self.refresh_s is not None and time.monotonic() - self._checked >= self.refresh_s
        if due and self._lock.acquire(blocking=False):
            try:
                self._refresh_locked(False)
            finally:
                self._lock.release()
        return self._snapshot

    # -- what is served -------------------------------------------------------------------------------

    @property
    def entries(self) -> dict[tuple[str, str], ModelEntry]:
        """The enabled versions, by ``(name, version)``."""
        return self._current().entries

    @property
    def disabled(self) -> dict[tuple[str, str], ModelEntry]:
        """The disabled versions, by ``(name, version)``."""
        return self._current().disabled

    @property
    def errors(self) -> list[str]:
        """Manifests that could not be served, and why."""
        return self._current().errors

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.entries})

    def versions(self, name: str, *, include_disabled: bool = False) -> list[str]:
        snapshot = self._current()
        keys = [*snapshot.entries, *(snapshot.disabled if include_disabled else {})]
        return sorted((v for n, v in keys if n == name), key=version_key)

    def latest(self) -> list[ModelEntry]:
        """The newest enabled version of every model (from one reading: a refresh meanwhile cannot drop a name)."""
        snapshot = self._current()
        return [_resolve(snapshot, name, False) for name in sorted({name for name, _ in snapshot.entries})]

    def listing(self, *, include_disabled: bool = False) -> list[ModelEntry]:
        """Every enabled version (and the disabled ones, if asked), by name and then version."""
        snapshot = self._current()
        found = [*snapshot.entries.values(), *(snapshot.disabled.values() if include_disabled else [])]
        return sorted(found, key=lambda entry: (entry.manifest.name, version_key(entry.manifest.version)))

    def is_disabled(self, reference: str) -> bool:
        """Whether ``name@version`` is a disabled version (as of the latest reading)."""
        name, _, version = reference.partition("@")
        return (name, version) in self._current().disabled

    def resolve(self, reference: str, *, include_disabled: bool = False) -> ModelEntry:
        """``name`` gives the newest enabled version; ``name@version`` exactly that one.

        A disabled version raises :class:`ModelDisabledError` (unless ``include_disabled``). A catalog
        that refreshes itself looks at its roots again before it gives up: the version may have been
        added (or enabled) a moment ago.
        """
        try:
            return _resolve(self._current(), reference, include_disabled)
        except ModelNotFoundError:
            if self.refresh_s is None or not self.refresh():
                raise
        return _resolve(self._snapshot, reference, include_disabled)

    # -- disabling --------------------------------------------------------------------------------------

    def disable(self, reference: str, note: str = "") -> ModelEntry:
        """Disable ``name@version``: write its ``DISABLED`` file (atomically), keep its files; idempotent.

        Raises ``ValueError`` without a version (disabling is per version), :class:`ModelNotFoundError`
        for an unknown one, and ``OSError`` where its folder cannot be written.
        """
        entry = self.resolve(_exact(reference), include_disabled=True)
        if not entry.disabled:
            stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            text = f"{entry.reference} disabled {stamp}{f': {note}' if note else ''}\n"
            text += "Not resolved for new work, its results not served; delete this file to enable it again.\n"
            handle, staged = tempfile.mkstemp(prefix=f".{DISABLED_FILE}.", dir=entry.folder)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(text)
                os.replace(staged, entry.folder / DISABLED_FILE)
            finally:
                Path(staged).unlink(missing_ok=True)
        self.refresh(force=True)
        return self.resolve(entry.reference, include_disabled=True)

    def enable(self, reference: str) -> ModelEntry:
        """Enable ``name@version`` again (delete its ``DISABLED`` file); idempotent."""
        entry = self.resolve(_exact(reference), include_disabled=True)
        (entry.folder / DISABLED_FILE).unlink(missing_ok=True)
        self.refresh(force=True)
        return self.resolve(entry.reference)

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
                entry.labels_on_disk()
            except (OSError, ManifestError) as error:
                problems.append(str(error))
            results.append(VerifyResult(entry.reference, not problems, tuple(problems)))
        return results


def _exact(reference: str) -> str:
    if not reference.partition("@")[2]:
        raise ValueError(f"{reference!r} names no version: give name@version")
    return reference


def _resolve(snapshot: _Snapshot, reference: str, include_disabled: bool) -> ModelEntry:
    name, _, version = reference.partition("@")
    served = sorted((v for n, v in snapshot.entries if n == name), key=version_key)
    off = sorted((v for n, v in snapshot.disabled if n == name), key=version_key)
    if not served and not off:
        known = ", ".join(sorted({n for n, _ in snapshot.entries})) or "none"
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {known}")
    if not version:
        if served:
            return snapshot.entries[(name, served[-1])]
        if include_disabled:
            return snapshot.disabled[(name, off[-1])]
        raise ModelDisabledError(f"every version of model {name!r} is disabled ({', '.join(off)})")
    if version in served:
        return snapshot.entries[(name, version)]
    if version in off:
        if include_disabled:
            return snapshot.disabled[(name, version)]
        others = f"; versions served: {', '.join(served)}" if served else "; no version of it is served"
        raise ModelDisabledError(f"model {name}@{version} is disabled{others}")
    disabled = f" (disabled: {', '.join(off)})" if off else ""
    raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {', '.join(served)}{disabled}")


def weights_format(path: Path) -> str:
    """``safetensors`` for ``.safetensors``; ``pytorch`` for ``.pt``/``.pth``/``.bin`` and timm's ``.pth.tar``."""
    suffix = weights_suffix(path.name)
    if suffix == ".safetensors":
        return "safetensors"
    if suffix is not None:
        return "pytorch"
    raise ManifestError(
        f"{path.name}: weights must be .safetensors (preferred) or a .pt/.pth/.bin/.pth.tar PyTorch checkpoint"
    )


def add_model(
    root: Path,
    fields: dict[str, Any],
    weights: Path,
    labels: Path | Sequence[str],
    overwrite: bool = False,
    check: Callable[[ModelEntry], object] | None = None,
    *,
    weights_details: Mapping[str, Any] | None = None,
) -> ModelEntry:
    """Register a user's model under ``root/<name>/<version>/`` and return its entry.

    ``fields`` are the manifest's fields but ``labels`` and ``artifacts``, which
    are taken from the files: the label count from ``labels`` (a labels file, or the
    names themselves), the checksum from ``weights``. ``weights_details`` go into the
    weights artifact's ``details`` (where the file came from, say). The manifest is
    validated before anything is written, and ``check`` (e.g. loading the model once)
    runs on the staged copy before it takes the version's place.
    """
    file_format = weights_format(weights)
    lines = labels.read_text(encoding="utf-8").splitlines() if isinstance(labels, Path) else labels
    label_list = [line.strip() for line in lines if line.strip()]
    artifact = describe_file(weights, file_format)
    stored_name = "model.safetensors" if file_format == "safetensors" else "model.pt"
    try:
        manifest = Manifest.model_validate(
            {
                **fields,
                "labels": {"file": "labels.txt", "count": len(label_list)},
                "artifacts": {
                    "weights": artifact.model_copy(update={"file": stored_name, "details": dict(weights_details or {})})
                },
            }
        )
    except ValidationError as error:
        raise ManifestError(describe_validation_error(error)) from error
    folder = root / manifest.name / manifest.version
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; choose another version or pass --overwrite")
    created = [p for p in (root, folder.parent) if not p.exists()]
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
        if folder.exists() and overwrite:
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError as error:  # another registration put this version in place meanwhile
            if folder.exists():
                raise FileExistsError(f"{folder} exists; choose another version or pass --overwrite") from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        # Folders made for this version go too when it did not take its place (deepest first).
        for made in reversed(created):
            if not folder.exists():
                with contextlib.suppress(OSError):  # not empty: something else lives there now
                    made.rmdir()
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
