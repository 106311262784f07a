"""The Celery tasks: one per job kind, each a few lines; how each kind runs is in :mod:`worker.jobs`.

Tasks take the job id only; the inputs are read from the store by key and the result goes
back to the store (:class:`classlens.core.jobs.JobStore`), so Celery's own results are ignored.
A task whose job ends failed raises :class:`~worker.jobs.failures.JobFailed` once the failure
is recorded, so that Celery (and Flower) see a FAILURE; it is expected (``throws``): logged in
one line, acknowledged like a success, never retried. The per-process runtime is built on a
task's first call, after the worker has forked (:mod:`worker.jobs.runtime`).
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from classlens.core.queue import ANALYSIS_TASK, AUDIT_TASK, EXPLAIN_TASK, MODEL_ADD_TASK
from worker.jobs.analysis import analysis_job
from worker.jobs.audit import audit_job
from worker.jobs.explain import explain_job
from worker.jobs.failures import JobFailed, raise_if_failed
from worker.jobs.outages import surviving_store_outages
from worker.jobs.registration import model_add_job
from worker.jobs.runtime import runtime

_OPTIONS: dict[str, Any] = {"ignore_result": True, "throws": (JobFailed,)}


@shared_task(name=EXPLAIN_TASK, **_OPTIONS)
def explain_task(job_id: str) -> None:
    """``classlens.explain(job_id)``: explain the job's image; the outcome is in the job record."""
    rt = runtime()
    raise_if_failed(surviving_store_outages(rt, job_id, lambda: explain_job(rt, job_id)))


@shared_task(name=AUDIT_TASK, **_OPTIONS)
def audit_task(job_id: str) -> None:
    """``classlens.audit(job_id)``: explain and summarise the audit's images; the outcome is in the job record."""
    rt = runtime()
    raise_if_failed(surviving_store_outages(rt, job_id, lambda: audit_job(rt, job_id)))


@shared_task(name=ANALYSIS_TASK, **_OPTIONS)
def analysis_task(job_id: str) -> None:
    """``classlens.analyse.run(job_id)``: run the job's analysis; the outcome (and figures) are in the store."""
    rt = runtime()
    raise_if_failed(surviving_store_outages(rt, job_id, lambda: analysis_job(rt, job_id)))


@shared_task(name=MODEL_ADD_TASK, **_OPTIONS)
def model_add_task(job_id: str) -> None:
    """``classlens.models.add(job_id)``: register the uploaded model; the outcome is in the job record."""
    # Not run again on a store outage: its upload folder is removed when a try ends (registering has effects).
    raise_if_failed(model_add_job(runtime(), job_id))
