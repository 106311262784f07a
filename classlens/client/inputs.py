"""The images of an audit or an analysis, in one of the forms the service reads.

A folder or a zip becomes one zip (multipart part ``archive``), so that the service reads its
``labels.csv`` by its own rules (columns ``file`` and ``label``, names relative to the CSV's
folder, a label a class index or name); a list of images becomes the JSON form, one
``{image, file, label}`` each. Nothing is decoded here: the service checks every image and
label, and refuses the request naming the file.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.csv"
# The suffixes a folder's images are recognised by; the service decodes by content, not by name.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

PathLike = str | os.PathLike[str]
# A folder, a zip file, a zip's bytes, or images (paths, or (name, bytes) pairs).
Images = PathLike | bytes | Sequence[PathLike | tuple[str, bytes]]
# A labels.csv file (folders and zips), or file name -> label, or (image lists only) one label per image.
Labels = PathLike | Mapping[str, int | str] | Sequence[int | str | None]


class InputError(ValueError):
    """The images or labels given to the client cannot be sent (a missing file, a folder without images)."""


@dataclass
class Body:
    """A request body: JSON, or a multipart form (``files`` and ``data``)."""

    json: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)


def _form_value(value: Any) -> str:
    """A parameter as a form field: lists comma-separated, booleans ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (by suffix, hidden files and folders left out), sorted."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


def labels_csv(labels: Mapping[str, int | str]) -> bytes:
    """``file,label`` lines for a mapping of file name to label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label"])
    for name, label in labels.items():
        writer.writerow([name, label])
    return buffer.getvalue().encode("utf-8")


def _labels_file(labels: Labels) -> bytes:
    if isinstance(labels, Mapping):
        return labels_csv(labels)
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.is_file():
            raise InputError(f"{path}: no such labels file")
        return path.read_bytes()
    raise InputError("labels for a folder or a zip are a labels.csv file or a mapping of file name to label")


def zip_folder(folder: Path, labels: Labels | None = None) -> bytes:
    """The folder's images as a zip (stored, not compressed: images are compressed already) with a labels.csv.

    With ``labels``, that file (or mapping) is the zip's ``labels.csv`` and any in the folder is left
    out; without, the folder's own ``labels.csv`` files travel, and the service reads them.
    """
    images = folder_images(folder)
    if not images:
        raise InputError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in images:
            archive.write(path, path.relative_to(folder).as_posix())
        if labels is not None:
            archive.writestr(LABELS_FILE, _labels_file(labels))
        else:
            for found in sorted(folder.rglob(LABELS_FILE)):
                relative = found.relative_to(folder)
                if not any(part.startswith(".") for part in relative.parts):
                    archive.write(found, relative.as_posix())
    return buffer.getvalue()


def with_labels(archive: bytes, labels: Labels) -> bytes:
    """The zip with ``labels`` appended at its root as ``labels.csv`` (nothing is inflated)."""
    buffer = io.BytesIO(archive)
    try:
        with zipfile.ZipFile(buffer, "a") as appended:
            appended.writestr(LABELS_FILE, _labels_file(labels))
    except zipfile.BadZipFile as error:
        raise InputError(f"not a readable zip file: {error}") from error
    return buffer.getvalue()


def _image_list(images: Sequence[PathLike | tuple[str, bytes]], labels: Labels | None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for position, image in enumerate(images):
        if isinstance(image, tuple):
            name, data = image
        else:
            path = Path(image)
            if not path.is_file():
                raise InputError(f"{path}: no such image file")
            name, data = path.name, path.read_bytes()
        item: dict[str, Any] = {"image": base64.b64encode(data).decode("ascii"), "file": name}
        label: int | str | None = None
        if isinstance(labels, Mapping):
            label = labels.get(name)
        elif labels is not None and not isinstance(labels, (str, os.PathLike)):
            if len(labels) != len(images):
                raise InputError(f"{len(labels)} labels for {len(images)} images: give one per image, in order")
            label = labels[position]
        elif labels is not None:
            raise InputError("labels for a list of images are a mapping of file name to label, or a list")
        if label is not None:
            item["label"] = label
        items.append(item)
    return items


def batch_body(model: str, images: Images, labels: Labels | None, parameters: Mapping[str, Any]) -> Body:
    """The body of ``POST /v1/audits`` or ``POST /v1/analyses`` for these images, labels and parameters."""
    present = {name: value for name, value in parameters.items() if value is not None}
    if isinstance(images, (bytes, bytearray)):
        archive = bytes(images) if labels is None else with_labels(bytes(images), labels)
    elif isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            archive = zip_folder(path, labels)
        elif path.is_file():
            archive = path.read_bytes() if labels is None else with_labels(path.read_bytes(), labels)
        else:
            raise InputError(f"{path}: no such folder or zip file")
    else:
        return Body(json={"model": model, "images": _image_list(images, labels), **present})
    data = {"model": model, **{name: _form_value(value) for name, value in present.items()}}
    return Body(files=[("archive", ("images.zip", archive, "application/octet-stream"))], data=data)
