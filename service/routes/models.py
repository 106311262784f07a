"""``/v1/models``: the catalog as clients need it (labels, grid, layers, preprocessing), and its management.

Reading: ``GET /v1/models`` (the newest enabled version of every model; with
``include_disabled=true`` every disabled version too) and ``GET /v1/models/{name}``.

Writing, while the service runs (both marked with the ``admin`` scope, :data:`service.auth.MODELS_WRITE`;
see :mod:`service.auth`):

- ``POST /v1/models`` registers an upload. The form is checked here with the same
  :class:`~model_store.sources.RegisterOptions` as ``classlens models add``, the files are
  written under canonical names into ``<data_dir>/uploads/<job id>`` and a ``model`` job is
  queued (``classlens.models.add`` on the ``models`` queue); the worker registers the folder
  into the user's store root and removes it. Nothing is queued for a form that is refused.
- ``DELETE /v1/models/{name}@{version}`` disables that version (a ``DISABLED`` file in its
  folder; see :meth:`model_store.catalog.Catalog.disable`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.datastructures import FileStorage, MultiDict

from classlens.core.contract import Job
from classlens.core.jobs import new_job_id
from classlens.core.queue import MODEL_ADD_TASK, enqueue
from classlens.core.requests import RequestError, invalid_parameters
from model_store.sources import (
    CONFIG_FILE,
    LABELS_FILE,
    PREPROCESSOR_CONFIG_FILE,
    RegisterOptions,
    weights_stem,
    weights_suffix,
)
from service import quotas
from service.app import Services, services
from service.auth import MODELS_WRITE, requires_scope
from service.errors import Problem
from service.job_responses import JobResource, wait_seconds
from service.model_info import detail, summary
from service.views import model_job_view

blueprint = Blueprint("models", __name__, url_prefix="/v1/models")

# Form fields, by how they are parsed (all validated by the contract first, then by RegisterOptions).
_TEXT_FIELDS = (
    "name",
    "version",
    "architecture",
    "colour_mode",
    "crop_mode",
    "interpolation",
    "description",
    "data",
    "licence",
)
_SIZE_FIELDS = ("input_size", "resize", "crop")
_FLOAT_LIST_FIELDS = ("mean", "std")
_BOOLEAN_FIELDS = ("ema", "analyses_only", "overwrite")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
# The optional file parts and the names the worker's ModelSources.locate looks for.
_FILES = {"config": CONFIG_FILE, "preprocessor_config": PREPROCESSOR_CONFIG_FILE, "labels": LABELS_FILE}
_JSON_FILES = ("config", "preprocessor_config")


def _flag(name: str) -> bool:
    return request.args.get(name, "false").strip().lower() in {"true", "1"}


@blueprint.get("")
def list_models() -> Response:
    """The newest enabled version of every model; with ``include_disabled=true`` also every disabled version."""
    catalog = services().catalog
    rows = [summary(entry, catalog) for entry in catalog.latest()]
    if _flag("include_disabled"):
        rows += [summary(entry, catalog) for entry in catalog.listing(include_disabled=True) if entry.disabled]
        rows.sort(key=lambda row: (row["name"], row["disabled"]))
    return jsonify({"models": rows})


@blueprint.get("/<name>")
def get_model(name: str) -> Response:
    """``name`` (its newest enabled version) or ``name@version``; unknown: 404, disabled: 410 unless asked for."""
    catalog = services().catalog
    return jsonify(detail(catalog.resolve(name, include_disabled=_flag("include_disabled")), catalog))


# -- registering ----------------------------------------------------------------------------------------


def _bad(detail: str, problem: str = "bad_parameter", title: str = "Invalid parameter", **extra: Any) -> RequestError:
    return RequestError(problem, detail, title, **extra)


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.strip().lower().partition("x")
    return int(height), int(width)


def _parsed(name: str, text: str) -> Any:
    """One field's value; the contract has checked its form, this is the second line of defence (a 422)."""
    try:
        if name in _SIZE_FIELDS:
            return _size(text)
        if name in _FLOAT_LIST_FIELDS:
            return [float(part) for part in text.split(",")]
        if name in _BOOLEAN_FIELDS:
            return _BOOLEANS[text.strip().lower()]
        return float(text)  # crop_pct
    except (ValueError, KeyError) as error:
        raise _bad(f"{name}: {text!r} cannot be read ({error})") from error


def _known_parts(form: MultiDict[str, str], files: MultiDict[str, FileStorage]) -> None:
    """Refuse a field or file this route does not know: a misspelt option must not be ignored silently."""
    known = {*_TEXT_FIELDS, *_SIZE_FIELDS, *_FLOAT_LIST_FIELDS, *_BOOLEAN_FIELDS, "crop_pct", "model_args"}
    unknown = sorted({*(set(form) - known), *(set(files) - {"weights", *_FILES})})
    if unknown:
        raise _bad(
            f"unknown form part(s): {', '.join(unknown)}; fields are {', '.join(sorted(known))} and files "
            f"weights, {', '.join(_FILES)}",
            "unknown_field",
            "Unknown field",
        )


def register_fields(form: MultiDict[str, str]) -> dict[str, Any]:
    """The ``RegisterOptions`` fields among validated form fields, parsed; the ones not sent are left out."""
    fields: dict[str, Any] = {name: form[name] for name in _TEXT_FIELDS if name in form}
    for name in (*_SIZE_FIELDS, *_FLOAT_LIST_FIELDS, *_BOOLEAN_FIELDS, "crop_pct"):
        if name in form:
            fields[name] = _parsed(name, form[name])
    if "model_args" in form:
        try:
            model_args = json.loads(form["model_args"])
        except json.JSONDecodeError as error:
            raise _bad(f"model_args is not JSON: {error}") from error
        if not isinstance(model_args, dict):
            raise _bad(f"model_args must be a JSON object, not {type(model_args).__name__}")
        fields["model_args"] = model_args
    return fields


def register_options(form: MultiDict[str, str]) -> RegisterOptions:
    """The form as ``classlens models add`` options; a 422 listing every field they refuse."""
    try:
        return RegisterOptions.model_validate(register_fields(form))
    except ValidationError as error:
        raise invalid_parameters(error) from error


def safe_weights_name(filename: str | None) -> str:
    """The uploaded weights' file name as a plain, safe name that keeps its suffix (``.safetensors``, ``.pth.tar``).

    Only the last path segment counts (a client may send ``C:\\models\\x.pt`` or ``../x.pt``), anything
    but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``, and the stem never starts with a dot
    (no hidden file, no ``..``). A name without a weights suffix is refused: the worker could not
    tell what it is.
    """
    base = re.split(r"[\\/]", filename or "")[-1].strip()
    suffix = weights_suffix(base)
    if suffix is None:
        raise _bad(
            f"the weights file {base or '(unnamed)'!r} must end in .safetensors (preferred), .bin, .pth, .pt or "
            ".pth.tar: the name tells the worker how to read it",
            "unsupported_weights",
            "Unsupported weights file",
        )
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", weights_stem(base)).lstrip(".")[:100] or "weights"
    return f"{stem}{suffix}"


def _save(upload: FileStorage, path: Path) -> None:
    upload.save(path)
    if path.stat().st_size == 0:
        raise _bad(f"the {upload.name} file is empty", "empty_file", "Empty file", file=upload.name or "")


def _check_text(role: str, path: Path) -> None:
    """Configs must be JSON objects and labels UTF-8 text: refused here rather than by a failed job."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _bad(f"the {role} file is not UTF-8 text: {error}", "bad_file", "Unusable file", file=role) from error
    if role in _JSON_FILES:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise _bad(f"the {role} file is not JSON: {error}", "bad_file", "Unusable file", file=role) from error
        if not isinstance(document, dict):
            raise _bad(f"the {role} file must hold a JSON object", "bad_file", "Unusable file", file=role)


def save_uploads(folder: Path, files: MultiDict[str, FileStorage]) -> dict[str, str]:
    """Write the upload's files into ``folder`` under the names the worker looks for; role -> file name."""
    weights = files.get("weights")
    if weights is None:
        raise Problem(400, "Missing weights", "send the weights as a file part named 'weights'", problem="missing_file")
    name = safe_weights_name(weights.filename)
    folder.mkdir(parents=True)
    saved = {"weights": name}
    _save(weights, folder / name)
    for role, canonical in _FILES.items():
        upload = files.get(role)
        if upload is None:
            continue
        _save(upload, folder / canonical)
        _check_text(role, folder / canonical)
        saved[role] = canonical
    return saved


@blueprint.post("")
@requires_scope(MODELS_WRITE)
def add_model() -> Response:
    """Queue the registration of an uploaded model (202 + ``Location`` of its job), after checking the form."""
    parts = services()
    settings = parts.settings
    _known_parts(request.form, request.files)
    options = register_options(request.form)
    reference = f"{options.name}@{options.version}"
    if (settings.user_model_dir / options.name / options.version).exists() and not options.overwrite:
        raise _bad(
            f"{reference} is registered already; choose another version, or send overwrite=true to replace it",
            "model_exists",
            "Version exists",
        )
    job_id = new_job_id()
    folder = settings.upload_dir / job_id
    try:
        saved = save_uploads(folder, request.files)
        job = quotas.create(
            parts,
            job_id=job_id,
            kind="model",
            model=reference,
            parameters={"options": options.model_dump(mode="json"), "files": saved},
            enqueue=lambda job: enqueue(
                parts.celery,
                MODEL_ADD_TASK,
                job.id,
                soft_time_limit_s=settings.model_add_soft_time_limit_s,
                time_limit_s=settings.model_add_time_limit_s,
            ),
        )
    except BaseException:  # nothing queued: nothing may stay behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    parts.metrics.submissions.labels("model", "queued").inc()
    return REGISTRATIONS.respond(parts, parts.jobs.wait(job, wait_seconds(parts)))


class _Registrations(JobResource):
    def respond(
        self, parts: Services, job: Job, *, cached: bool = False, status: int | None = None, result: bytes | None = None
    ) -> Response:
        if job.status == "succeeded":
            parts.catalog.refresh()  # the client's next request names the new version: serve it at once
        return super().respond(parts, job, cached=cached, status=status, result=result)


REGISTRATIONS = _Registrations("model", "model registration", model_job_view, "models.get_model_job")


@blueprint.get("/jobs/<id>")
def get_model_job(id: str) -> Response:
    """A registration job; long-poll it with ``?wait=``. A failed one says why in its ``error``."""
    return REGISTRATIONS.polled(id)


# -- disabling ---------------------------------------------------------------------------------------------


@blueprint.delete("/<name>")
@requires_scope(MODELS_WRITE)
def disable_model(name: str) -> Response:
    """Disable ``name@version`` (204, idempotent): not resolved for new work, its results no longer served.

    The files stay; deleting the ``DISABLED`` file in the version's folder enables it again.
    """
    parts = services()
    if not name.partition("@")[2]:
        versions = ", ".join(parts.catalog.versions(name)) or "none"
        raise _bad(
            f"disabling is per version: send {name}@VERSION (versions served: {versions})",
            "version_required",
            "Version needed",
        )
    try:  # an unknown version is a ModelNotFoundError: a 404 problem
        parts.catalog.disable(name, note="through DELETE /v1/models")
    except OSError as error:
        raise _bad(
            f"{name}'s folder cannot be written ({error.strerror or error}); disable it where the store is writable",
            "store_read_only",
            "Cannot disable",
        ) from error
    return Response(status=204)
