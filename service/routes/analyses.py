"""``/v1/analyses``: a representation analysis of one model (or two) over a batch of images, as one job.

The images arrive as for audits (a zip, repeated ``images`` parts, or JSON with base64
images; labels optional) and the parameters are the fields of
:class:`~classlens.core.contract.AnalysisRequest`. Everything is checked before anything is
queued: both models, the parameters against the kind and the model's grid, the number of
images, every image and label. One task (``classlens.analyse.run``, queue ``analyses``) is
then sent with the job id. The worker stores each figure under its digest; the result names
them, and this blueprint serves them: ``figures/<name>.png``, and ``report.html`` for
``compare``.

The content key covers both models' result fingerprints (weights, labels, preprocessing,
architecture, structure: :attr:`~model_store.catalog.ModelEntry.result_fingerprint`), the
images' manifest (files, bytes, labels) and the canonical parameters (``compare_to`` resolved
to ``name@version``), so an equal analysis is a cache hit or joins the one in flight.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, url_for
from pydantic import ValidationError
from werkzeug.datastructures import FileStorage, MultiDict

from classlens.core.capabilities import BOTH_MODELS_KINDS, analysis_needs
from classlens.core.contract import (
    ANALYSIS_MIN_IMAGES,
    ANALYSIS_RULES,
    AnalysisRequest,
    AnalysisRules,
    analysis_kinds,
    layer_problem,
)
from classlens.core.jobs import content_key
from classlens.core.queue import ANALYSIS_TASK
from model_store.catalog import ModelEntry
from service.app import Services, services
from service.audit_input import AuditInput, resolve_labels, uploads_from_form, uploads_from_json
from service.batches import check_images, counting_rejections, read_input, store_images, submit_batch
from service.errors import Problem
from service.job_responses import JobResource, finished_result, resolve_model
from service.model_info import model_info
from service.params import invalid_parameters, require
from service.views import REPORT, analysis_view

blueprint = Blueprint("analyses", __name__, url_prefix="/v1/analyses")
ANALYSES = JobResource("analysis", "analysis", analysis_view, "analyses.get_analysis")

# Which kind takes what is the kinds' rules table (ANALYSIS_RULES), which the worker checks again.
TAKES_SECOND_MODEL = analysis_kinds(lambda rules: rules.second_model != "never")
TAKES_REGION = analysis_kinds(lambda rules: rules.region)


def _rules(kind: str) -> AnalysisRules:
    """The kind's row; a kind that is none (the contract refuses it first) takes nothing extra."""
    return ANALYSIS_RULES.get(kind, AnalysisRules())


PARAMETERS = tuple(AnalysisRequest.model_fields)
_TEXT_FIELDS = ("kind", "compare_to", "representation", "prefix_rows", "agreement", "no_cls")
_INTEGER_FIELDS = ("batch_size", "top_memories", "layer")


def form_parameters(form: MultiDict[str, str]) -> dict[str, Any]:
    """The analysis parameters among validated form fields, parsed (``region`` is comma-separated)."""
    fields: dict[str, Any] = {name: form[name] for name in _TEXT_FIELDS if name in form}
    fields.update({name: int(form[name]) for name in _INTEGER_FIELDS if name in form})
    if "ridge" in form:
        fields["ridge"] = float(form["ridge"])
    if "region" in form:
        fields["region"] = [int(part) for part in form["region"].split(",")]
    return fields


def _from_json(body: Mapping[str, Any], parts: Services) -> AuditInput:
    fields = {name: body[name] for name in PARAMETERS if name in body}
    return AuditInput(body["model"], uploads_from_json(body, parts.settings.analysis_max_images), fields)


def _from_form(form: MultiDict[str, str], files: MultiDict[str, FileStorage], parts: Services) -> AuditInput:
    uploads = uploads_from_form(form, files, parts.settings, parts.settings.analysis_max_images)
    return AuditInput(form["model"], uploads, form_parameters(form))


def _bad(detail: str, problem: str = "bad_parameter", title: str = "Invalid parameter") -> Problem:
    return Problem(422, title, detail, problem=problem)


def _resolve(parts: Services, reference: str, field: str) -> ModelEntry:
    return resolve_model(parts, reference, field)


def _second_model(parts: Services, fields: Mapping[str, Any]) -> ModelEntry | None:
    kind = fields["kind"]
    reference = fields.get("compare_to")
    if reference is None:
        if _rules(kind).second_model == "required":
            raise _bad(
                f"{kind} needs compare_to: the model to compare with", "missing_compare_to", "Second model needed"
            )
        return None
    if _rules(kind).second_model == "never":
        raise _bad(f"compare_to is used by {' and '.join(sorted(TAKES_SECOND_MODEL))} only, not by {kind}")
    return _resolve(parts, reference, "compare_to")


def _check_region(fields: Mapping[str, Any], entry: ModelEntry) -> None:
    """``region`` belongs to perturb, and must be a non-empty box inside the model's grid (when the API knows it)."""
    region = fields.get("region")
    if region is None:
        return
    if not _rules(fields["kind"]).region:
        raise _bad(f"region is used by {' and '.join(sorted(TAKES_REGION))} only, not by {fields['kind']}")
    row0, col0, row1, col1 = region
    grid = model_info(entry.manifest).grid
    inside = grid is None or (row1 <= grid[0] and col1 <= grid[1])
    if not (row0 < row1 and col0 < col1 and inside):
        where = f" inside the {grid[0]}x{grid[1]} grid" if grid else ""
        raise _bad(
            f"region {list(region)} is not a box (row0, col0, row1, col1), end-exclusive, with row0 < row1 and"
            f" col0 < col1{where}",
            "bad_region",
        )


def _check_needs(fields: Mapping[str, Any], entry: ModelEntry, second: ModelEntry | None) -> None:
    """Refuse a kind the manifest says the model cannot run (the worker checks the same table)."""
    kind = fields["kind"]
    needs = analysis_needs(kind, fields.get("representation", "tokens"))
    require(entry.manifest, entry.reference, needs, kind)
    if second is not None and kind in BOTH_MODELS_KINDS:
        require(second.manifest, second.reference, needs & {"cls"}, f"{kind} (compare_to)")


def analysis_request(
    parts: Services, fields: Mapping[str, Any], entry: ModelEntry
) -> tuple[AnalysisRequest, ModelEntry | None]:
    """The canonical request (``compare_to`` as ``name@version``) and the second model, if any."""
    second = _second_model(parts, fields)
    _check_needs(fields, entry, second)
    _check_region(fields, entry)
    try:
        request = AnalysisRequest.model_validate({**fields, "compare_to": second.reference if second else None})
    except ValidationError as error:
        raise invalid_parameters(error) from error
    problem = layer_problem(request.kind, request.layer, model_info(entry.manifest).layers)
    if problem is not None:
        raise _bad(problem)
    return request, second


def _labels(labels: list[int | None], kind: str) -> None:
    """Every image labelled, or none; probes need every label."""
    labelled = sum(1 for label in labels if label is not None)
    if 0 < labelled < len(labels):
        raise _bad(
            f"{labelled} of {len(labels)} images have a label: label every image or none",
            "partial_labels",
            "Bad labels",
        )
    if _rules(kind).labels == "required" and not labelled:
        raise _bad(f"{kind} needs the true class of every image: send labels", "missing_labels", "Labels needed")


def _submit(parts: Services) -> Response:
    settings = parts.settings
    submitted = read_input(lambda body: _from_json(body, parts), lambda form, files: _from_form(form, files, parts))
    entry = _resolve(parts, submitted.model, "model")
    request, second = analysis_request(parts, submitted.fields, entry)
    count = len(submitted.uploads)
    if count < ANALYSIS_MIN_IMAGES:
        raise _bad(
            f"{count} images were sent; an analysis needs at least {ANALYSIS_MIN_IMAGES}",
            "too_few_images",
            "Too few images",
        )
    labels = resolve_labels(submitted.uploads, entry.labels())
    _labels(labels, request.kind)
    check_images(parts, submitted.uploads, "Unusable image in analysis")

    manifest_key = store_images(parts, submitted.uploads, labels)
    analysis = request.model_dump(mode="json")
    parameters = {
        "analysis": analysis,
        "manifest_key": manifest_key,
        "images": count,
        "labelled": sum(1 for label in labels if label is not None),
    }
    key_parameters = {"analysis": analysis, "compare_to_fingerprint": second.result_fingerprint if second else None}
    fingerprints = {entry.reference: entry.result_fingerprint}
    if second is not None:
        fingerprints[second.reference] = second.result_fingerprint
    job, cached = submit_batch(
        parts,
        kind="analysis",
        task=ANALYSIS_TASK,
        model=entry.reference,
        parameters=parameters,
        key=content_key(entry.result_fingerprint, manifest_key, key_parameters),
        fingerprints=fingerprints,
        images=count,
        soft_time_limit_s=settings.analysis_soft_time_limit_s,
        time_limit_s=settings.analysis_time_limit_s,
        images_counter=parts.metrics.analysis_images,
    )
    return ANALYSES.respond(parts, job, cached=cached)


@blueprint.post("")
def create_analysis() -> Response:
    """Queue an analysis (or answer from the cache, or join the equal analysis in flight)."""
    parts = services()
    return counting_rejections(parts.metrics.rejected_analyses, lambda: _submit(parts))


@blueprint.get("/<id>")
def get_analysis(id: str) -> Response:
    """The analysis with its progress ``{done, total}`` while it runs, and its result once it has succeeded."""
    return ANALYSES.polled(id)


def _figure(parts: Services, job_id: str, name: str) -> bytes:
    """The bytes of one figure of a succeeded analysis (``REPORT``: the HTML report); 404 without it, 410 expired."""
    job = ANALYSES.find(parts, job_id)
    figures: dict[str, str] = json.loads(finished_result(parts, job, "analysis")).get("figures", {})
    if name == REPORT and name not in figures:
        raise Problem(404, "No report", f"analysis {job.id} has no report (compare has one)", problem="no_report")
    if name not in figures:
        names = ", ".join(sorted(figure for figure in figures if figure != REPORT)) or "none"
        raise Problem(
            404,
            "Unknown figure",
            f"analysis {job.id} has no figure {name!r}; figures: {names}",
            problem="unknown_figure",
        )
    data = parts.jobs.figure(figures[name])
    if data is None:
        raise Problem(410, "Figure expired", f"the figures of analysis {job.id} have expired", problem="expired")
    return data


@blueprint.get("/<id>/figures/<name>.png")
def get_figure(id: str, name: str) -> Response:
    """One figure as PNG, as the worker drew it (the HTML report is not one: see ``report.html``)."""
    parts = services()
    if name == REPORT:
        ANALYSES.find(parts, id)  # an unknown analysis is still a 404 unknown_job
        where = url_for("analyses.get_report", id=id)
        raise Problem(
            404, "Unknown figure", f"the report is not a PNG figure: it is HTML, at {where}", problem="unknown_figure"
        )
    response = Response(_figure(parts, id, name), mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@blueprint.get("/<id>/report.html")
def get_report(id: str) -> Response:
    """The model-comparison report (compare): one HTML page with its figures, no scripts allowed."""
    response = Response(_figure(services(), id, REPORT), mimetype="text/html")
    # Written by our worker, but it quotes model names and labels: the page may show images and styles only.
    response.headers["Content-Security-Policy"] = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response
