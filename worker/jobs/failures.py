"""How a job fails: the title each expected error gives it, and the exception its task then raises.

An expected failure (the request's or the model's fault) is recorded with its title and the
error's own words; any other error is recorded as an internal error and logged with its
traceback. Either way the task then raises :class:`JobFailed`, so that Celery, and a monitor
such as Flower, count the task as failed rather than succeeded.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from classlens.core.contract import Job
from classlens.core.images import ImageError
from model_store.artifacts import ArtifactError
from model_store.catalog import ModelChangedError, ModelDisabledError, ModelNotFoundError
from model_store.manifest import ManifestError
from worker.analyses.job import AnalysisError
from worker.jobs.runtime import Runtime
from worker.lens.explain import ExplainError
from worker.lens.vit import UnsupportedModelError
from worker.model_loader import ModelLoadError
from worker.registration import RegistrationError

log = logging.getLogger(__name__)


class InputExpired(LookupError):
    """An uploaded image or list of images is no longer in the store (its TTL ran out before the job ran)."""


class JobFailed(Exception):
    """Raised by a task whose job ended failed, once the failure is in the job record.

    The task declares it expected (Celery's ``throws``): the worker logs it in one line, without
    a traceback; the message is acknowledged as after a success (late acknowledgement acknowledges
    a failure too) and nothing retries it.
    """


# Failures that are the request's or the model's fault, with the title the job gets.
EXPECTED: tuple[tuple[type[BaseException], str], ...] = (
    (ImageError, "The image cannot be decoded"),
    (InputExpired, "The uploaded input has expired"),
    (AnalysisError, "The analysis cannot be run"),
    (RegistrationError, "The model cannot be registered"),
    (ModelChangedError, "The model changed"),
    (ModelDisabledError, "The model is disabled"),
    (ExplainError, "The request cannot be explained"),
    (UnsupportedModelError, "The model cannot be explained"),
    (ModelNotFoundError, "Unknown model"),
    (ModelLoadError, "The model cannot be loaded"),
    (ArtifactError, "The model's files do not match its manifest"),
    (ManifestError, "The model's manifest is invalid"),
    (ValidationError, "Invalid job parameters"),
)


def failure_title(error: BaseException) -> str | None:
    """The title of an expected failure; None for any other error."""
    for kind, title in EXPECTED:
        if isinstance(error, kind):
            return title
    return None


def record_failure(rt: Runtime, job: Job, error: Exception) -> Job:
    """Mark the job failed with a title a person can act on (an unexpected error is logged, too)."""
    title = failure_title(error)
    if title is None:
        log.exception("job %s failed unexpectedly", job.id)
        title, detail = "Internal error", f"{type(error).__name__}: {error}"
    else:
        detail = getattr(error, "detail", None) or str(error)
    return rt.jobs.fail(job, title, detail)


def raise_if_failed(job: Job | None) -> None:
    """Raise :class:`JobFailed` when the job (as its task leaves it) has failed; gone or otherwise: nothing."""
    if job is None or job.status != "failed":
        return
    title = job.error.title if job.error is not None else "failed"
    raise JobFailed(f"job {job.id}: {title}")
