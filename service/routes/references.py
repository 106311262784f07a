"""``/v1/models/{name}/versions/{version}/reference``: the audit live traffic of a model version is compared with.

``PUT`` marks a finished audit of that version as its reference (its rows' signals are copied into
the store, so the reference outlives the audit's result), ``GET`` shows it with the drift of the
current window, ``DELETE`` removes it. All three need the ``admin`` scope: a reference decides what
every drift alert of the version means. See :mod:`classlens.core.monitoring` and docs/monitoring.md.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from classlens.core import monitoring
from classlens.core.contract import AuditResult
from classlens.core.requests import RequestError
from service.app import Services, services
from service.auth import ADMIN, requires_scope
from service.job_responses import find_job, stored_result

blueprint = Blueprint("references", __name__, url_prefix="/v1/models")
ROUTE = "/<name>/versions/<version>/reference"


def _model(parts: Services, name: str, version: str) -> str:
    """``name@version`` as the catalog serves it (an unknown version is a 404, a disabled one a 410)."""
    return parts.catalog.resolve(f"{name}@{version}").reference


def _body(parts: Services, reference: monitoring.Reference) -> dict[str, Any]:
    settings = parts.settings
    window = monitoring.read_window(parts.store, reference.model, settings.drift_window)
    enough = len(window) >= settings.drift_min_window
    drift = (
        monitoring.drift(reference, window, bins=settings.drift_bins, max_classes=settings.metrics_max_classes)
        if enough
        else {}
    )
    return reference.body() | {"window": len(window), "drift": drift}


@blueprint.put(ROUTE)
@requires_scope(ADMIN)
def put_reference(name: str, version: str) -> Response:
    """Mark a succeeded audit of this version as its reference (replacing any earlier one)."""
    parts = services()
    model = _model(parts, name, version)
    audit_id = str((request.get_json(silent=True) or {}).get("audit", ""))
    job = find_job(parts, audit_id, "audit", "audit")
    if job.model != model:
        raise RequestError(
            "other_model", f"audit {job.id} is an audit of {job.model}, not of {model}", "Audit of another model"
        )
    if job.status != "succeeded":
        detail = "it failed" if job.status == "failed" else f"it is {job.status}; wait for it to succeed"
        raise RequestError("not_ready", f"audit {job.id} has no result: {detail}", "Audit not finished")
    result = stored_result(parts, job, "audit")
    try:
        reference = monitoring.reference_from_audit(model, job.id, AuditResult.model_validate_json(result or b""))
    except ValidationError:
        reference = None
    if reference is None:
        raise RequestError(
            "no_signals", f"audit {job.id} was made by an older version and has no signals; audit again", "No signals"
        )
    monitoring.save_reference(parts.store, reference)
    return jsonify(_body(parts, reference))


@blueprint.get(ROUTE)
@requires_scope(ADMIN)
def get_reference(name: str, version: str) -> Response:
    """The version's reference, the size of its window of recent explanations and their drift from it."""
    parts = services()
    model = _model(parts, name, version)
    reference = monitoring.load_reference(parts.store, model)
    if reference is None:
        raise RequestError("no_reference", f"{model} has no reference audit; PUT one", "No reference")
    return jsonify(_body(parts, reference))


@blueprint.delete(ROUTE)
@requires_scope(ADMIN)
def delete_reference(name: str, version: str) -> Response:
    """Remove the version's reference (204, idempotent): no drift is reported for it until another is set."""
    parts = services()
    monitoring.delete_reference(parts.store, _model(parts, name, version))
    return Response(status=204)
