"""A job computed on its own under its claim: an audit, an analysis, a registration (explanations are batched)."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded

from classlens.core import stats
from classlens.core.contract import Job
from classlens.core.store import StoreError
from worker.jobs.failures import record_failure
from worker.jobs.runtime import Runtime, resume


def run_single(rt: Runtime, job_id: str, noun: str, soft_limit_s: int, compute: Callable[[Job], bytes]) -> Job | None:
    """Run one job to a terminal status; None when the record is gone.

    Idempotent like :func:`worker.jobs.explain.explain_job`: a redelivered job whose result
    exists is just marked succeeded; one redelivered mid-way (its worker died) starts again from
    the beginning. ``compute`` returns the result JSON and may record progress on the way, so the
    record is read again before it is finished.
    """
    jobs = rt.jobs
    job, needs_work = resume(rt, job_id)
    if job is None or not needs_work:
        return job
    if not rt.batches.claim(job_id):
        return job  # a live worker runs it (see explain_job)
    try:
        job, needs_work = resume(rt, job_id)
        if job is None or not needs_work:
            return job
        job = jobs.progress(jobs.start(job), 0)
        started = time.monotonic()
        try:
            result = compute(job)
        except SoftTimeLimitExceeded:
            job = jobs.fail(
                jobs.get(job.id) or job, "Time limit exceeded", f"the {noun} took longer than {soft_limit_s} s"
            )
        except StoreError:
            raise  # not the job's fault: the task runs it again once the store answers
        except Exception as error:
            job = record_failure(rt, jobs.get(job.id) or job, error)
        else:
            job = jobs.succeed(jobs.get(job.id) or job, result)
        stats.record_job(
            jobs.store, kind=job.kind, model=job.model, status=job.status, duration_s=time.monotonic() - started
        )
        return job
    finally:
        rt.batches.release([job_id])
