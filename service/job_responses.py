"""What the explanation, audit and analysis routes share: finding a job, long-polling it, answering with it.

One place for the job-as-HTTP rules: a finished job answers 200, an unfinished one 202
with its ``Location``; a succeeded job whose result has expired is 410, and so is any job
of a model version that has been disabled since (``model_disabled``: its results are no
longer served); ``?wait=S`` long-polls up to the configured cap. And one place for how a
submission names its model: an unknown one and a disabled one are each a 422 of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Response, request, url_for

from classlens.core.contract import TERMINAL_STATUSES, Job, JobKind
from model_store.catalog import ModelDisabledError, ModelEntry, ModelNotFoundError
from service.app import Services, services
from service.auth import may_see
from service.errors import Problem

JobView = Callable[..., dict[str, Any]]


def wait_seconds(parts: Services) -> float:
    """The ``wait`` query parameter (validated by the contract), capped by settings."""
    return min(float(request.args.get("wait", 0) or 0), parts.settings.max_wait_s)


def resolve_model(parts: Services, reference: str, field: str | None = None) -> ModelEntry:
    """The catalog entry a submission names; a 422 ``unknown_model`` or ``model_disabled`` (after ``field``)."""
    where = f"{field}: " if field else ""
    try:
        return parts.catalog.resolve(reference)
    except ModelDisabledError as error:
        raise Problem(422, "Model disabled", f"{where}{error}", problem="model_disabled") from error
    except ModelNotFoundError as error:
        raise Problem(422, "Unknown model", f"{where}{error}", problem="unknown_model") from error


def job_models(job: Job) -> list[str]:
    """Every model version a job's result depends on (an analysis may compare two)."""
    models = [job.model]
    analysis = job.parameters.get("analysis")
    if isinstance(analysis, dict) and isinstance(analysis.get("compare_to"), str):
        models.append(analysis["compare_to"])
    return models


def find_job(parts: Services, job_id: str, kind: JobKind, noun: str) -> Job:
    """The caller's job, or 404; 410 ``model_disabled`` when a model it depends on has been disabled."""
    job = parts.jobs.get(job_id)
    # Another key's job is answered exactly like one that does not exist: its id tells nothing.
    if job is None or job.kind != kind or not may_see(job, parts.auth):
        raise Problem(404, f"Unknown {noun}", f"there is no {noun} {job_id!r} (jobs expire)", problem="unknown_job")
    if kind != "model":
        for model in job_models(job):
            if parts.catalog.is_disabled(model):
                raise Problem(
                    410,
                    "Model disabled",
                    f"{model} has been disabled: the results of {noun} {job.id} are no longer served",
                    problem="model_disabled",
                )
    return job


def stored_result(parts: Services, job: Job, noun: str) -> bytes | None:
    """The result of a succeeded job (None while it is not); 410 once it has expired."""
    if job.status != "succeeded":
        return None
    result = parts.jobs.result(job.content_key)
    if result is None:
        raise Problem(
            410, "Result expired", f"the result of {noun} {job.id} has expired; submit again", problem="expired"
        )
    return result


def finished_result(parts: Services, job: Job, noun: str) -> bytes:
    """The result of a job that must have succeeded: 409 while it has not, 410 once it has expired."""
    result = stored_result(parts, job, noun)
    if result is None:
        raise Problem(
            409, f"{noun.capitalize()} not succeeded", f"{noun} {job.id} is {job.status}", problem="not_ready"
        )
    return result


def job_response(
    parts: Services,
    job: Job,
    view: JobView,
    endpoint: str,
    noun: str,
    *,
    cached: bool = False,
    status: int | None = None,
    result: bytes | None = None,
) -> Response:
    """The job as JSON; ``result`` is its stored result when the caller holds it already (a cache hit).

    The stored result goes into the body as it is stored (the view splices it), and orjson encodes
    the rest: keys sorted as Flask's own encoder sorts them, UTF-8 as JSON is.
    """
    if result is None:
        result = stored_result(parts, job, noun)
    body = orjson.dumps(view(job, result, cached=cached, spliced=True), option=orjson.OPT_SORT_KEYS)
    response = Response(body, mimetype="application/json")
    response.status_code = status or (200 if job.status in TERMINAL_STATUSES else 202)
    response.headers["Location"] = url_for(endpoint, id=job.id)
    return response


@dataclass(frozen=True)
class JobResource:
    """One job kind as an HTTP resource: how its jobs are found, shown and long-polled.

    Each route module declares its kind once (``AUDITS = JobResource("audit", ...)``) and keeps
    only what is its own: how a job is submitted, and its downloads.
    """

    kind: JobKind
    noun: str  # how errors name a job of this kind ("audit", "explanation job")
    view: JobView
    endpoint: str  # the route that answers GET /<id> (the Location of every response)

    def find(self, parts: Services, job_id: str) -> Job:
        return find_job(parts, job_id, self.kind, self.noun)

    def respond(
        self, parts: Services, job: Job, *, cached: bool = False, status: int | None = None, result: bytes | None = None
    ) -> Response:
        return job_response(
            parts, job, self.view, self.endpoint, self.noun, cached=cached, status=status, result=result
        )

    def finished(self, parts: Services, job_id: str) -> tuple[Job, bytes]:
        """A job of this kind that must have succeeded, with its result (409 while not, 410 expired)."""
        job = self.find(parts, job_id)
        return job, finished_result(parts, job, self.noun)

    def polled(self, job_id: str) -> Response:
        """``GET /<id>``: the job, long-polled for up to ``?wait=`` seconds, always 200."""
        parts = services()
        job, result = parts.jobs.wait_for_result(self.find(parts, job_id), wait_seconds(parts))
        return self.respond(parts, job, status=200, result=result)
