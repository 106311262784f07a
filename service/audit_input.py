"""From an audit (or analysis) request (a zip, repeated image parts, or JSON) to named images with optional labels.

Every form ends in the same list of :class:`AuditUpload`, so a route checks images, labels
and limits once. A zip is untrusted twice over: its central directory is judged before anything
is inflated (entry count, declared total and per-file sizes, unsafe paths, encryption), and
each member is then read with a cap of its declared size, so a directory that lies about
sizes cannot make the API inflate more than the limits allow.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import posixpath
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from werkzeug.datastructures import FileStorage, MultiDict

from classlens.core.requests import ClassNames, RequestError, parse_class
from classlens.core.settings import Settings
from service.params import form_fields

LABELS_FILE = "labels.csv"
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class AuditUpload:
    """One image as uploaded: its name, its bytes and its true class as the client wrote it (if any)."""

    file: str
    data: bytes
    label: int | str | None = None


@dataclass(frozen=True)
class AuditInput:
    model: str
    uploads: list[AuditUpload]
    fields: dict[str, Any] = field(default_factory=dict)


def _bad(title: str, detail: str, problem: str, **extra: Any) -> RequestError:
    return RequestError(problem, detail, title, **extra)


def _too_many(count: int, limit: int) -> RequestError:
    return _bad(
        "Too many images",
        f"{count} images were sent; at most {limit} are accepted in one request (split it)",
        "too_many_images",
    )


# -- JSON and multipart --------------------------------------------------------------------------------


def uploads_from_json(body: Mapping[str, Any], limit: int) -> list[AuditUpload]:
    """The images of a validated JSON body: ``images`` is a list of ``{image (base64), file?, label?}``."""
    items = body["images"]
    if len(items) > limit:
        raise _too_many(len(items), limit)
    uploads = []
    for position, item in enumerate(items):
        name = item.get("file") or f"image-{position + 1:04d}"
        try:
            data = base64.b64decode(item["image"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise _bad(
                "Invalid base64", f"{name}: the image is not valid base64", "invalid_base64", file=name
            ) from error
        uploads.append(AuditUpload(name, data, item.get("label")))
    return uploads


def uploads_from_form(
    form: MultiDict[str, str], files: MultiDict[str, FileStorage], settings: Settings, limit: int
) -> list[AuditUpload]:
    """The images of a validated multipart body: a zip in ``archive``, or ``images`` parts with ``labels`` in order."""
    archive = files.get("archive")
    images = files.getlist("images")
    if (archive is None) == (not images):
        raise _bad(
            "Send a zip or images",
            "send either one zip file as the part 'archive' or the images as repeated parts 'images', not both",
            "missing_images" if archive is None else "ambiguous_input",
        )
    if archive is not None:
        return read_archive(archive.read(), settings, limit)
    if len(images) > limit:
        raise _too_many(len(images), limit)
    labels = form.getlist("labels")
    if labels and len(labels) != len(images):
        raise _bad(
            "Labels do not match images",
            f"{len(labels)} 'labels' parts for {len(images)} 'images' parts: send one label per image, in order",
            "label_count",
        )
    return [
        AuditUpload(
            upload.filename or f"image-{position + 1:04d}",
            upload.read(),
            parse_class(labels[position]) if labels else None,
        )
        for position, upload in enumerate(images)
    ]


def from_json(body: Mapping[str, Any], settings: Settings) -> AuditInput:
    """A validated ``AuditJsonRequest``."""
    fields = {key: body[key] for key in ("targets", "top_k", "layers") if key in body}
    return AuditInput(model=body["model"], uploads=uploads_from_json(body, settings.audit_max_images), fields=fields)


def from_form(form: MultiDict[str, str], files: MultiDict[str, FileStorage], settings: Settings) -> AuditInput:
    """A validated ``AuditFormRequest``."""
    uploads = uploads_from_form(form, files, settings, settings.audit_max_images)
    fields = {key: value for key, value in form_fields(form).items() if key in {"targets", "top_k", "layers"}}
    return AuditInput(model=form["model"], uploads=uploads, fields=fields)


# -- zip -----------------------------------------------------------------------------------------------


def _unsafe(name: str) -> bool:
    """Absolute paths (POSIX, Windows, drive letters) and any ``..`` component; backslashes count as separators."""
    path = name.replace("\\", "/")
    return path.startswith("/") or bool(_DRIVE.match(path)) or ".." in path.split("/")


def _ignored(name: str) -> bool:
    """macOS resource forks (``__MACOSX/``) and hidden files such as ``.DS_Store``: not images, never audited."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts if part)


def _members(archive: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    """The files worth reading, after every check the central directory allows."""
    entries = archive.infolist()
    if len(entries) > settings.audit_max_zip_entries:
        raise _bad(
            "Zip has too many entries",
            f"the zip has {len(entries)} entries; at most {settings.audit_max_zip_entries} are accepted",
            "zip_too_many_entries",
        )
    declared = sum(entry.file_size for entry in entries)
    if declared > settings.audit_max_uncompressed_bytes:
        raise _bad(
            "Zip too large uncompressed",
            f"the zip declares {declared:,} bytes uncompressed; at most {settings.audit_max_uncompressed_bytes:,}"
            " are accepted",
            "zip_too_large",
        )
    members: list[zipfile.ZipInfo] = []
    seen: set[str] = set()
    for entry in entries:
        name = entry.filename
        if _unsafe(name):
            raise _bad(
                "Unsafe path in zip", f"{name}: absolute paths and '..' are not accepted", "unsafe_path", file=name
            )
        if entry.is_dir() or _ignored(name):
            continue
        if entry.file_size > settings.audit_max_file_bytes:
            raise _bad(
                "File in zip too large",
                f"{name}: {entry.file_size:,} bytes uncompressed; at most {settings.audit_max_file_bytes:,} per file",
                "zip_file_too_large",
                file=name,
            )
        if entry.flag_bits & 0x1:
            raise _bad("Encrypted zip entry", f"{name}: encrypted entries are not accepted", "bad_zip", file=name)
        if name in seen:
            raise _bad("Duplicate file in zip", f"{name} appears twice in the zip", "duplicate_file", file=name)
        seen.add(name)
        members.append(entry)
    return members


def _read_member(archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> bytes:
    """The member's bytes, never more than its declared size (zipfile stops there; the extra byte proves it)."""
    try:
        with archive.open(entry) as member:
            data = member.read(entry.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as error:
        raise _bad(
            "Unreadable zip entry",
            f"{entry.filename}: cannot be extracted ({error})",
            "bad_zip",
            file=entry.filename,
        ) from error
    if len(data) > entry.file_size:
        raise _bad(
            "Unreadable zip entry",
            f"{entry.filename}: larger than its declared size",
            "bad_zip",
            file=entry.filename,
        )
    return data


def _read_labels(text: str, folder: str) -> dict[str, int | str]:
    """``labels.csv`` (columns ``file`` and ``label``; others ignored), file names relative to its folder."""
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"file", "label"} <= {name.strip() for name in rows.fieldnames}:
        raise _bad("Bad labels.csv", "labels.csv needs a header with the columns 'file' and 'label'", "bad_labels")
    labels: dict[str, int | str] = {}
    for row in rows:
        cells = {key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
        if not cells.get("file"):
            continue
        if not cells.get("label"):
            raise _bad("Bad labels.csv", f"labels.csv: {cells['file']} has no label", "bad_labels")
        labels[posixpath.normpath(posixpath.join(folder, cells["file"]))] = parse_class(cells["label"])
    return labels


def read_archive(data: bytes, settings: Settings, limit: int) -> list[AuditUpload]:
    """The images of a zip (at most ``limit``) with their labels from an optional ``labels.csv`` (one, anywhere)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError) as error:
        raise _bad("Not a zip file", "the 'archive' part is not a readable zip file", "not_a_zip") from error
    with archive:
        members = _members(archive, settings)
        label_files = [entry for entry in members if posixpath.basename(entry.filename) == LABELS_FILE]
        if len(label_files) > 1:
            raise _bad("Several labels.csv", "the zip holds more than one labels.csv", "bad_labels")
        images = [entry for entry in members if entry not in label_files]
        if len(images) > limit:
            raise _too_many(len(images), limit)
        if not images:
            raise _bad("No images", "the zip holds no images", "missing_images")
        labels: dict[str, int | str] = {}
        if label_files:
            raw = _read_member(archive, label_files[0])
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                raise _bad("Bad labels.csv", "labels.csv is not UTF-8 text", "bad_labels") from error
            labels = _read_labels(text, posixpath.dirname(label_files[0].filename))
        names = {entry.filename for entry in images}
        stray = sorted(name for name in labels if name not in names)
        if stray:
            listed = ", ".join(stray[:10]) + (" ..." if len(stray) > 10 else "")
            raise _bad("Labels for missing files", f"labels.csv names files not in the zip: {listed}", "bad_labels")
        return [
            AuditUpload(entry.filename, _read_member(archive, entry), labels.get(entry.filename)) for entry in images
        ]


def resolve_labels(uploads: Sequence[AuditUpload], classes: Sequence[str]) -> list[int | None]:
    """True class indices, by the rule targets follow (:class:`~classlens.core.requests.ClassNames`).

    Refused as ``unknown_label`` naming every label that names no class, not only the first.
    """
    names = ClassNames(classes)
    resolved: list[int | None] = []
    unknown: dict[str, str] = {}
    for upload in uploads:
        label = upload.label
        index = None if label is None else names.find(label)
        if label is not None and index is None:
            unknown.setdefault(str(label), upload.file)
        resolved.append(index)
    if unknown:
        named = ", ".join(f"{label!r} ({file})" for label, file in list(unknown.items())[:10])
        raise _bad(
            "Unknown label",
            f"labels that are neither a class index (0..{len(classes) - 1}) nor a class name: {named}",
            "unknown_label",
            labels=sorted(unknown),
        )
    return resolved
