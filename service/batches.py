"""What audits and analyses share: many images sent as one job, checked, stored and queued together.

Both routes read the same inputs (:mod:`service.audit_input`), decode every image once before
anything is stored, keep the images under their own keys with a manifest naming them, and
queue one task with the job id and time limits of its own. The job is then long-polled
(``?wait=``) like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from flask import Response, request
from prometheus_client import Counter
from werkzeug.datastructures import FileStorage, MultiDict

from classlens.core.contract import AuditImage, AuditManifest, Job, JobKind
from classlens.core.images import ImageError
from classlens.core.queue import enqueue
from classlens.core.requests import RequestError
from service import quotas
from service.app import Services
from service.audit_input import AuditUpload
from service.decoding import check_decodable
from service.errors import Problem, problem_for
from service.job_responses import wait_seconds
from service.limits import integral_numbers

Input = TypeVar("Input")


def read_input(
    from_json: Callable[[Mapping[str, Any]], Input],
    from_form: Callable[[MultiDict[str, str], MultiDict[str, FileStorage]], Input],
) -> Input:
    """The request's input, from a JSON body or from a multipart form (both validated by the contract).

    JSON numbers are read by value (``2.0`` is 2), as the contract's validator read them.
    """
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise Problem(400, "Malformed request body", "the body is not a JSON object", problem="malformed_body")
        return from_json(integral_numbers(body))
    return from_form(request.form, request.files)


def check_images(parts: Services, uploads: Sequence[AuditUpload], title: str) -> None:
    """Decode every image once; the first bad one refuses the whole request with a 422 that names it."""
    for upload in uploads:
        try:
            check_decodable(upload.data, parts.settings.max_image_pixels)
        except ImageError as error:
            parts.metrics.rejected_images.labels(error.problem).inc()
            raise Problem(
                422, title, f"{upload.file}: {error.detail}", problem=error.problem, file=upload.file
            ) from error


def store_images(parts: Services, uploads: Sequence[AuditUpload], labels: Sequence[int | None]) -> str:
    """Every image under its own key, and the manifest naming them (with their labels); the manifest's key."""
    images = [
        AuditImage(file=upload.file, image_key=parts.jobs.put_image(upload.data), label=label)
        for upload, label in zip(uploads, labels, strict=True)
    ]
    return parts.jobs.put_manifest(AuditManifest(images=images).model_dump_json().encode())


def submit_batch(
    parts: Services,
    *,
    kind: JobKind,
    task: str,
    model: str,
    parameters: Mapping[str, Any],
    key: str,
    images: int,
    soft_time_limit_s: int,
    time_limit_s: int,
    images_counter: Counter,
    fingerprints: Mapping[str, str] | None = None,
) -> tuple[Job, bool]:
    """Queue the job (or find it cached, or join the equal one in flight), count it, and long-poll it.

    Returns the job and whether to show it as ``cached`` (:attr:`classlens.core.jobs.Submission.cached`). The job
    is the caller's (:func:`service.quotas.submit`).

    ``fingerprints`` are the result fingerprints of the models the key was made from (see ``JobStore.submit``).
    """
    submission = quotas.submit(
        parts,
        kind=kind,
        model=model,
        parameters=parameters,
        key=key,
        image_key=None,
        enqueue=lambda job: enqueue(
            parts.celery, task, job.id, soft_time_limit_s=soft_time_limit_s, time_limit_s=time_limit_s
        ),
        total=images,
        inflight_ttl_s=time_limit_s,
        fingerprints=fingerprints,
    )
    parts.metrics.submissions.labels(kind, submission.outcome).inc()
    images_counter.labels(submission.outcome).inc(images)
    job = submission.job
    if submission.outcome != "cached":
        job = parts.jobs.wait(job, wait_seconds(parts))
    return job, submission.cached


def counting_rejections(counter: Counter, handle: Callable[[], Response]) -> Response:
    """``handle()``, counting each request it refuses with a 4xx by the problem's name."""
    try:
        return handle()
    except (Problem, RequestError) as refusal:
        problem = problem_for(refusal)
        if 400 <= problem.status < 500:
            counter.labels(problem.problem).inc()
        raise
