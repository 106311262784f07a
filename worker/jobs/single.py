"""A job computed on its own under its claim: an audit, an analysis, a registration (explanations are batched)."""

from __future__ import annotations

import time
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded

from classlens.core import stats
from classlens.core.contract import TERMINAL_STATUSES, Job, Progress
from classlens.core.store import StoreError
from worker.jobs.failures import record_failure
from worker.jobs.runtime import Runtime, look_up, resume


def run_single(rt: Runtime, job_id: str, noun: str, soft_limit_s: int, compute: Callable[[Job], bytes]) -> Job | None:
    """Run one job to a terminal status; None when the record is gone.

    Idempotent like :func:`worker.jobs.explain.explain_job`: a redelivered job whose result
    exists is just marked succeeded; one redelivered mid-way (its worker died) starts again from
    the beginning. ``compute`` returns the result JSON and may record progress on the way, so the
    record is read again before it is finished.
    """
    jobs = rt.jobs
    job = look_up(rt, job_id)
    if job is None or job.status in TERMINAL_STATUSES:
        return job
    if not rt.batches.claim(job_id):
        return job  # a live worker runs it (see explain_job)
    try:
        job, needs_work = resume(rt, job_id)
        if job is None or not needs_work:
            return job
        with jobs.store.writes() as writes:
            # What jobs.progress(jobs.start(job), 0) writes, as one record.
            progress = Progress(done=0, total=job.progress.total)
            job = jobs.update(job, writes=writes, status="running", started_at=time.time(), progress=progress)
        started = time.monotonic()
        result: bytes | None = None
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
        duration_s = time.monotonic() - started
        if result is not None:
            job = jobs.get(job.id) or job  # with the progress ``compute`` recorded
        # One round trip: the counters, then (when it succeeded) the records, as explain_job writes them.
        with jobs.store.writes() as writes:
            status = job.status if result is None else "succeeded"
            stats.record_job(writes, kind=job.kind, model=job.model, status=status, duration_s=duration_s)
            if result is not None:
                job = jobs.succeed(job, result, writes=writes)
        return job
    finally:
        rt.batches.release([job_id])
