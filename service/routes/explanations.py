"""``/v1/explanations``: submit one image, follow its job, fetch its relevance maps as PNG.

A submission is checked completely before anything is queued (the contract, the model,
the classes and layers, and the image itself is decoded once), so a job that is accepted
can only fail for reasons the request could not have known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, request
from PIL import Image

from classlens.core import batching
from classlens.core.capabilities import EXPLAIN_NEEDS
from classlens.core.contract import BASELINE_MAPS, BASELINE_TITLES, Job
from classlens.core.images import ImageError, fit_to_input
from classlens.core.jobs import Lookup, Submission, cache_hit_record, content_key, sha256_hex
from classlens.core.queue import EXPLAIN_TASK, enqueue
from classlens.core.render import render_overlay, to_png_bytes
from classlens.core.requests import ClassNames, RequestError, parse_class
from model_store.catalog import ModelEntry, ModelNotFoundError
from model_store.manifest import Manifest
from service import quotas
from service.app import Services, services
from service.batches import read_input
from service.decoding import check_decodable, with_decoded
from service.job_responses import JobResource, resolve_model, stored_result, wait_seconds
from service.model_info import model_info
from service.params import ExplainInput, canonical_request, from_form, from_json, require
from service.views import job_view

blueprint = Blueprint("explanations", __name__, url_prefix="/v1/explanations")
EXPLANATIONS = JobResource("explanation", "explanation job", job_view, "explanations.get_explanation")


@blueprint.post("")
def create_explanation() -> Response:
    """Answer from the cache, join the equal job in flight, or queue a new job."""
    parts = services()
    submitted = read_input(from_json, from_form)
    submission = submit_explanation(parts, check_explanation(parts, submitted, record_hit=True))
    job, result = submission.job, submission.result
    if submission.outcome != "cached":
        job, result = parts.jobs.wait_for_result(job, wait_seconds(parts))
    return EXPLANATIONS.respond(parts, job, cached=submission.cached, result=result)


@dataclass(frozen=True)
class CheckedExplanation:
    """An explanation request found complete and sound (:func:`check_explanation`), not yet submitted."""

    submitted: ExplainInput
    entry: ModelEntry
    parameters: dict[str, Any]
    key: str
    image_key: str
    looked_up: Lookup  # the cache under ``key`` as the check found it

    @property
    def seen_before(self) -> bool:
        """A stored result means these exact bytes were decoded and explained before."""
        return self.looked_up.result is not None


def check_explanation(parts: Services, submitted: ExplainInput, *, record_hit: bool = False) -> CheckedExplanation:
    """Everything about one explanation request that can be known before it is queued, or why it is refused.

    With :func:`submit_explanation`, the one way an explanation is submitted: ``POST /v1/explanations``
    and the KServe route (:mod:`service.routes.kserve`, which checks all its instances first) both use it.
    ``record_hit``: the request is submitted right after this check, so a cache hit's job record may be
    saved with the look-up (one trip, not two), unless the submission could still be refused (a key's
    cap on jobs in flight): a record nobody is told of must not be left behind.
    """
    entry = resolve_model(parts, submitted.model)
    require(entry.manifest, entry.reference, EXPLAIN_NEEDS, "an explanation")
    explain_request = canonical_request(submitted.fields, entry.labels(), model_info(entry.manifest))
    parameters = explain_request.model_dump(mode="json")
    image_key = sha256_hex(submitted.image)
    key = content_key(entry.result_fingerprint, image_key, parameters)
    # A stored result means these exact bytes were decoded and explained before: a cache hit
    # skips decoding and re-storing the image (measured: the bulk of a hit's time for 224x224 PNGs).
    # The submission goes by this look-up too, so the cache is read once per request.
    fingerprints = {entry.reference: entry.result_fingerprint}
    record = None
    if record_hit and quotas.refuses_nothing():
        record = cache_hit_record(
            kind="explanation",
            model=entry.reference,
            parameters=parameters,
            key=key,
            image_key=image_key,
            fingerprints=fingerprints,
        )
    looked_up = parts.jobs.lookup(key, record=record)
    if looked_up.result is None:
        try:
            check_decodable(submitted.image, parts.settings.max_image_pixels)
        except ImageError as error:
            parts.metrics.rejected_images.labels(error.problem).inc()
            raise
    return CheckedExplanation(submitted, entry, parameters, key, image_key, looked_up)


def submit_explanation(parts: Services, checked: CheckedExplanation) -> Submission:
    """Answer a checked request from the cache, join its equal job in flight, or store its image and queue a job."""
    image = checked.submitted.image
    if not checked.seen_before:
        parts.jobs.put_image(image)

    def enqueue_job(job: Job) -> None:
        if checked.seen_before:  # the result expired between the check and now: the worker needs the image
            parts.jobs.put_image(image)
        enqueue(parts.celery, EXPLAIN_TASK, job.id)
        if parts.settings.batch_max > 1:  # let the worker that takes a job up take this one along
            batching.offer(parts.jobs.store, job, parts.settings.result_ttl_s)

    submission = quotas.submit(
        parts,
        kind="explanation",
        model=checked.entry.reference,
        parameters=checked.parameters,
        key=checked.key,
        image_key=checked.image_key,
        enqueue=enqueue_job,
        fingerprints={checked.entry.reference: checked.entry.result_fingerprint},
        looked_up=checked.looked_up,
    )
    parts.metrics.submissions.labels("explanation", submission.outcome).inc()
    return submission


@blueprint.get("/<id>")
def get_explanation(id: str) -> Response:
    return EXPLANATIONS.polled(id)


def _target(explanation: dict[str, Any], target: str) -> dict[str, Any]:
    """The explained target a URL names, by index or label, as a submission names its targets."""
    candidates = {candidate["index"]: candidate for candidate in explanation["targets"]}
    index = ClassNames({index: candidate["label"] for index, candidate in candidates.items()}).find(parse_class(target))
    if index is not None:
        return dict(candidates[index])
    explained = ", ".join(f"{t['index']} ({t['label']})" for t in explanation["targets"])
    raise RequestError("unknown_target", f"{target!r} was not explained; targets: {explained}", "Unknown target")


def _map_of(explanation: dict[str, Any], target: dict[str, Any], kind: str) -> tuple[list[list[float]], str]:
    if kind == "gradient":
        if target.get("gradient_map") is None:
            raise RequestError("no_map", "submit the job with gradient_map: true", "No gradient map")
        return target["gradient_map"], f"{target['label']}: gradient relevance"
    if kind in BASELINE_MAPS:
        maps_of = target.get("baseline_maps") or {}
        if kind not in maps_of:
            raise RequestError("no_map", f"submit the job with baseline_maps: [{kind}]", f"No {kind} map")
        return maps_of[kind], f"{target['label']}: {BASELINE_TITLES[kind]}"
    maps: dict[str, list[list[float]]] = target["projection_maps"]
    layer = str(int(request.args["layer"])) if "layer" in request.args else list(maps)[-1]
    if layer not in maps:
        raise RequestError(
            "no_map", f"layer {layer} was not computed; layers: {', '.join(maps)}", "No map at this layer"
        )
    title = f"{target['label']}: {explanation['map_kind']} at layer {layer} of {explanation['layers']}"
    return maps[layer], title


@blueprint.get("/<id>/maps/<target>.png")
def get_map(id: str, target: str) -> Response:
    """One target's map over the image as the network saw it, rendered here (no torch needed)."""
    parts = services()
    job = EXPLANATIONS.find(parts, id)
    if job.status != "succeeded":
        raise RequestError("not_ready", f"job {job.id} is {job.status}", "Job not succeeded")
    explanation = json.loads(stored_result(parts, job, "explanation job") or b"{}")
    chosen = _target(explanation, target)
    kind = request.args.get("kind", "projection")
    values, title = _map_of(explanation, chosen, kind)
    data, manifest = _image_and_manifest(parts, job)
    colormap = "RdBu_r" if kind == "gradient" else "inferno"

    def draw(image: Image.Image) -> bytes:
        overlay = render_overlay(
            fit_to_input(image, manifest.input, manifest.preprocessing),
            np.asarray(values, dtype=np.float64),
            title=title,
            colormap=colormap,
            preprocessing=manifest.preprocessing,  # the caption says the picture is the model's input
        )
        return to_png_bytes(overlay)

    png = with_decoded(data, parts.settings.max_image_pixels, draw)
    response = Response(png, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


def _image_and_manifest(parts: Services, job: Job) -> tuple[bytes, Manifest]:
    """The job's uploaded image and its model's manifest, or why either is gone (410)."""
    data = parts.jobs.image(job.image_key) if job.image_key else None
    if data is None:
        raise RequestError("expired", f"the image of job {job.id} has expired", "Image expired")
    try:
        manifest = parts.catalog.resolve(job.model).manifest
    except ModelNotFoundError as error:
        raise RequestError("expired", f"{job.model} is no longer in the catalog", "Model gone") from error
    return data, manifest


@blueprint.get("/<id>/input.png")
def get_input(id: str) -> Response:
    """The image as the network saw it (after resize and crop), without a map: the viewer draws maps over it."""
    parts = services()
    job = EXPLANATIONS.find(parts, id)
    if job.status != "succeeded":
        raise RequestError("not_ready", f"job {job.id} is {job.status}", "Job not succeeded")
    data, manifest = _image_and_manifest(parts, job)

    def draw(image: Image.Image) -> bytes:
        return to_png_bytes(fit_to_input(image, manifest.input, manifest.preprocessing))

    response = Response(with_decoded(data, parts.settings.max_image_pixels, draw), mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response
