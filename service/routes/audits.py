"""``/v1/audits``: explain a batch of images in one job and summarise the classifier's decisions.

As with explanations, everything is checked before anything is queued: the zip's safety,
the number of images, every image (decoded once), every label and the parameters. Only then
are the images stored (each under its own key) with a manifest naming them, and one task
(``classlens.audit``, queue ``audits``) is sent with the job id. Equal audits (same model,
images, names, labels and parameters) share one content key, hence one result and one run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, request

from classlens.contract import AuditImage, AuditManifest, ExplainRequest, Job
from classlens.images import ImageError, decode_image
from classlens.jobs import content_key
from classlens.queue import AUDIT_TASK, enqueue
from model_store.catalog import ModelNotFoundError
from service.app import Services, services
from service.audit_input import AuditInput, AuditUpload, from_form, from_json, resolve_labels
from service.errors import Problem
from service.job_responses import find_job, job_response, stored_result, wait_seconds
from service.model_info import ModelInfo, model_info
from service.params import canonical_request
from service.views import audit_view

blueprint = Blueprint("audits", __name__, url_prefix="/v1/audits")

# The columns of rows.csv: every scalar of an AuditRow (the per-layer locations stay in the JSON).
CSV_COLUMNS = (
    "file",
    "true_index",
    "true_label",
    "predicted_index",
    "predicted_label",
    "probability",
    "correct",
    "predicted_emergence_layer",
    "true_emergence_layer",
    "explained_index",
    "explained_label",
    "peak_row",
    "peak_col",
    "central_share",
    "border_share",
)


def _read_input(parts: Services) -> AuditInput:
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise Problem(400, "Malformed request body", "the body is not a JSON object", problem="malformed_body")
        return from_json(body, parts.settings)
    return from_form(request.form, request.files, parts.settings)


def audit_request(fields: dict[str, Any], labels: Sequence[str], info: ModelInfo) -> ExplainRequest:
    """The explain parameters of an audit, canonical: top-1 by default, the last layer always, no sublayers.

    The last block's map locates each row's relevance, so it is added to any layers asked for;
    the sublayer streams are not summarised by an audit, so they are not computed.
    """
    values = dict(fields)
    values.setdefault("top_k", 1)
    explain = canonical_request(values, labels, info)
    layers = explain.layers
    if layers is not None and info.layers is not None and info.layers not in layers:
        layers = sorted([*layers, info.layers])
    return explain.model_copy(update={"layers": layers, "sublayers": False})


def _check_images(parts: Services, uploads: Sequence[AuditUpload]) -> None:
    """Decode every image once; the first bad one refuses the whole audit with a 422 that names it."""
    for upload in uploads:
        try:
            decode_image(upload.data, max_pixels=parts.settings.max_image_pixels)
        except ImageError as error:
            parts.metrics.rejected_images.labels(error.problem).inc()
            raise Problem(
                422,
                "Unusable image in audit",
                f"{upload.file}: {error.detail}",
                problem=error.problem,
                file=upload.file,
            ) from error


def _submit(parts: Services) -> Response:
    submitted = _read_input(parts)
    if not submitted.uploads:
        raise Problem(422, "No images", "the audit holds no images", problem="missing_images")
    try:
        entry = parts.catalog.resolve(submitted.model)
    except ModelNotFoundError as error:
        raise Problem(422, "Unknown model", str(error), problem="unknown_model") from error
    classes = entry.labels()
    true_labels = resolve_labels(submitted.uploads, classes)
    explain = audit_request(submitted.fields, classes, model_info(entry.manifest))
    _check_images(parts, submitted.uploads)

    images = [
        AuditImage(file=upload.file, image_key=parts.jobs.put_image(upload.data), label=label)
        for upload, label in zip(submitted.uploads, true_labels, strict=True)
    ]
    manifest_key = parts.jobs.put_manifest(AuditManifest(images=images).model_dump_json().encode())
    explain_parameters = explain.model_dump(mode="json")
    parameters = {
        "explain": explain_parameters,
        "manifest_key": manifest_key,
        "images": len(images),
        "labelled": sum(1 for label in true_labels if label is not None),
    }
    settings = parts.settings
    submission = parts.jobs.submit(
        kind="audit",
        model=entry.reference,
        parameters=parameters,
        key=content_key(entry.manifest.weights.sha256, manifest_key, {"audit": explain_parameters}),
        image_key=None,
        enqueue=lambda job: enqueue(
            parts.celery,
            AUDIT_TASK,
            job.id,
            soft_time_limit_s=settings.audit_soft_time_limit_s,
            time_limit_s=settings.audit_time_limit_s,
        ),
        total=len(images),
        inflight_ttl_s=settings.audit_time_limit_s,
    )
    parts.metrics.submissions.labels("audit", submission.outcome).inc()
    parts.metrics.audit_images.labels(submission.outcome).inc(len(images))
    job = submission.job
    if submission.outcome != "cached":
        job = parts.jobs.wait(job, wait_seconds(parts))
    return _respond(parts, job, cached=submission.outcome == "cached")


@blueprint.post("")
def create_audit() -> Response:
    """Queue an audit (or answer from the cache, or join the equal audit in flight)."""
    parts = services()
    try:
        return _submit(parts)
    except Problem as problem:
        if 400 <= problem.status < 500:
            parts.metrics.rejected_audits.labels(problem.problem).inc()
        raise


def _job(parts: Services, job_id: str) -> Job:
    return find_job(parts, job_id, "audit", "audit")


def _respond(parts: Services, job: Job, *, cached: bool = False, status: int | None = None) -> Response:
    return job_response(parts, job, audit_view, "audits.get_audit", "audit", cached=cached, status=status)


def _finished_result(parts: Services, job_id: str) -> tuple[Job, bytes]:
    job = _job(parts, job_id)
    result = stored_result(parts, job, "audit")
    if result is None:
        raise Problem(409, "Audit not succeeded", f"audit {job.id} is {job.status}", problem="not_ready")
    return job, result


@blueprint.get("/<id>")
def get_audit(id: str) -> Response:
    """The audit with its progress ``{done, total}`` while it runs, and its result once it has succeeded."""
    parts = services()
    job = parts.jobs.wait(_job(parts, id), wait_seconds(parts))
    return _respond(parts, job, status=200)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rows_csv(result: dict[str, Any]) -> str:
    """One line per image with the :data:`CSV_COLUMNS`; empty cells for nulls, ``true``/``false`` for booleans."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in result["rows"]:
        writer.writerow([_cell(row[column]) for column in CSV_COLUMNS])
    return buffer.getvalue()


def _attachment(body: str | bytes, mimetype: str, filename: str) -> Response:
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@blueprint.get("/<id>/rows.csv")
def get_rows_csv(id: str) -> Response:
    job, result = _finished_result(services(), id)
    return _attachment(rows_csv(json.loads(result)), "text/csv", f"audit-{job.id}-rows.csv")


@blueprint.get("/<id>/report.json")
def get_report(id: str) -> Response:
    job, result = _finished_result(services(), id)
    return _attachment(result, "application/json", f"audit-{job.id}-report.json")
