"""``/v1/audits``: explain a batch of images in one job and summarise the classifier's decisions.

As with explanations, everything is checked before anything is queued: the zip's safety,
the number of images, every image (decoded once), every label and the parameters. Only then
are the images stored (each under its own key) with a manifest naming them, and one task
(``classlens.audit``, queue ``audits``) is sent with the job id. Equal audits (same model,
images, names, labels and parameters) share one content key, hence one result and one run.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response
from PIL import Image, UnidentifiedImageError

from classlens.core.audit_report import rows_csv
from classlens.core.capabilities import EXPLAIN_NEEDS
from classlens.core.contract import AUDIT_MAP_KIND, AuditManifest, ExplainRequest
from classlens.core.jobs import content_key
from classlens.core.queue import AUDIT_TASK
from classlens.core.requests import RequestError
from service.app import Services, services
from service.audit_input import from_form, from_json, resolve_labels
from service.batches import check_images, counting_rejections, read_input, store_images, submit_batch
from service.job_responses import JobResource, resolve_model
from service.model_info import ModelInfo, model_info
from service.params import canonical_request, require
from service.views import audit_view

blueprint = Blueprint("audits", __name__, url_prefix="/v1/audits")
AUDITS = JobResource("audit", "audit", audit_view, "audits.get_audit")


def audit_request(fields: dict[str, Any], labels: Sequence[str], info: ModelInfo) -> ExplainRequest:
    """The explain parameters of an audit, canonical: top-1 by default, the last layer always, no sublayers.

    The last block's map locates each row's relevance, so it is added to any layers asked for;
    its kind is the audits' own (:data:`~classlens.core.contract.AUDIT_MAP_KIND`, see
    ``worker.audits.audit_row``); the sublayer streams are not summarised by an audit, so they
    are not computed.
    """
    values = dict(fields)
    values.setdefault("top_k", 1)
    values["map_kind"] = AUDIT_MAP_KIND
    explain = canonical_request(values, labels, info)
    layers = explain.layers
    if layers is not None and info.layers is not None and info.layers not in layers:
        layers = sorted([*layers, info.layers])
    return explain.model_copy(update={"layers": layers, "sublayers": False})


def _submit(parts: Services) -> Response:
    settings = parts.settings
    submitted = read_input(lambda body: from_json(body, settings), lambda form, files: from_form(form, files, settings))
    if not submitted.uploads:
        raise RequestError("missing_images", "the audit holds no images", "No images")
    entry = resolve_model(parts, submitted.model)
    require(entry.manifest, entry.reference, EXPLAIN_NEEDS, "an audit")
    classes = entry.labels()
    true_labels = resolve_labels(submitted.uploads, classes)
    explain = audit_request(submitted.fields, classes, model_info(entry.manifest))
    check_images(parts, submitted.uploads, "Unusable image in audit")

    manifest_key = store_images(parts, submitted.uploads, true_labels)
    explain_parameters = explain.model_dump(mode="json")
    parameters = {
        "explain": explain_parameters,
        "manifest_key": manifest_key,
        "images": len(submitted.uploads),
        "labelled": sum(1 for label in true_labels if label is not None),
    }
    job, cached = submit_batch(
        parts,
        kind="audit",
        task=AUDIT_TASK,
        model=entry.reference,
        parameters=parameters,
        key=content_key(entry.result_fingerprint, manifest_key, {"audit": explain_parameters}),
        fingerprints={entry.reference: entry.result_fingerprint},
        images=len(submitted.uploads),
        soft_time_limit_s=settings.audit_soft_time_limit_s,
        time_limit_s=settings.audit_time_limit_s,
        images_counter=parts.metrics.audit_images,
    )
    return AUDITS.respond(parts, job, cached=cached)


@blueprint.post("")
def create_audit() -> Response:
    """Queue an audit (or answer from the cache, or join the equal audit in flight)."""
    parts = services()
    return counting_rejections(parts.metrics.rejected_audits, lambda: _submit(parts))


@blueprint.get("/<id>")
def get_audit(id: str) -> Response:
    """The audit with its progress ``{done, total}`` while it runs, and its result once it has succeeded."""
    return AUDITS.polled(id)


def _attachment(body: str | bytes, mimetype: str, filename: str) -> Response:
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@blueprint.get("/<id>/rows.csv")
def get_rows_csv(id: str) -> Response:
    job, result = AUDITS.finished(services(), id)
    return _attachment(rows_csv(json.loads(result)), "text/csv", f"audit-{job.id}-rows.csv")


@blueprint.get("/<id>/report.json")
def get_report(id: str) -> Response:
    job, result = AUDITS.finished(services(), id)
    return _attachment(result, "application/json", f"audit-{job.id}-report.json")


def _media_type(data: bytes) -> str:
    """The media type of an uploaded image, from its header alone (every stored image was decoded once already)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"


@blueprint.get("/<id>/images/<int:index>")
def get_image(id: str, index: int) -> Response:
    """The image of row ``index`` (rows follow the upload order) as it was uploaded, byte for byte.

    The audit browser draws its thumbnails from it and sends it on to ``/v1/explanations`` to
    open a row in the viewer. Served once the audit has succeeded, like its other downloads.
    """
    parts = services()
    job, _ = AUDITS.finished(parts, id)
    listed = parts.jobs.manifest(str(job.parameters.get("manifest_key", "")))
    if listed is None:
        raise RequestError("expired", f"the images of audit {job.id} have expired", "Images expired")
    images = AuditManifest.model_validate_json(listed).images
    if not 0 <= index < len(images):
        numbered = f"numbered 0 to {len(images) - 1}"
        raise RequestError("unknown_image", f"audit {job.id} has {len(images)} images, {numbered}", "Unknown image")
    data = parts.jobs.image(images[index].image_key)
    if data is None:
        raise RequestError("expired", f"{images[index].file}: the image of audit {job.id} has expired", "Image expired")
    response = Response(data, mimetype=_media_type(data))
    response.headers["Cache-Control"] = "private, max-age=3600"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
