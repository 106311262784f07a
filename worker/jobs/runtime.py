"""What one worker process needs (settings, store, claims, loaded models), built once per process.

Built lazily on first use, after the worker has forked, so that models load once per process
and CUDA is never initialised in a parent; a forked child builds its own. The settings come
from the environment, which is where the ``classlens worker`` command read its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from celery import Celery

from classlens.core.batching import BatchQueue
from classlens.core.contract import TERMINAL_STATUSES, Job
from classlens.core.jobs import JobStore
from classlens.core.leases import new_worker_id, start_liveness
from classlens.core.queue import create_celery, send_job
from classlens.core.settings import Settings
from classlens.core.store import open_store
from model_store.catalog import Catalog
from worker.runtime import ModelCache

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What one worker process needs, built once per process."""

    settings: Settings
    jobs: JobStore
    models: ModelCache
    pid: int
    # Made on first use (see the properties).
    claims_queue: BatchQueue | None = None
    sender: Celery | None = None

    @property
    def batches(self) -> BatchQueue:
        """This process's claims on jobs (its own and its batch companions'), tied to its heartbeat.

        A claim's TTL is only an upper bound (the longest hard limit): it normally ends with its job,
        or with its holder's heartbeat (:mod:`classlens.core.leases`).
        """
        if self.claims_queue is None:
            longest = max(
                self.settings.task_time_limit_s,
                self.settings.audit_time_limit_s,
                self.settings.analysis_time_limit_s,
                self.settings.model_add_time_limit_s,
            )
            self.claims_queue = BatchQueue(self.jobs.store, lease_s=longest, worker_id=new_worker_id())
        return self.claims_queue

    @property
    def celery(self) -> Celery:
        """Where jobs held by a dead worker are sent again (the reaper in this process's liveness thread)."""
        if self.sender is None:
            self.sender = create_celery(self.settings)
        return self.sender

    @property
    def worker_id(self) -> str:
        return self.batches.claims.worker_id


_built: Runtime | None = None


def runtime(settings: Settings | None = None) -> Runtime:
    """This process's runtime, built on first use (and again in a forked child).

    Without ``settings`` they are read from the environment when it is built; a caller that
    passes other settings than those it was built with (a test) gets one built with them.
    """
    global _built
    current = _built
    if current is None or current.pid != os.getpid() or (settings is not None and settings is not current.settings):
        current = _built = _build(settings or Settings())
    return current


def _build(settings: Settings) -> Runtime:
    jobs = JobStore(open_store(settings), ttl_s=settings.result_ttl_s, inflight_ttl_s=settings.task_time_limit_s)
    # The catalog refreshes itself, so that models added or disabled while the worker runs are seen.
    catalog = Catalog.default(settings.model_roots, refresh_s=settings.catalog_refresh_s)
    models = ModelCache(
        catalog,
        settings.device,
        settings.onnx,
        settings.precision,
        max_models=settings.model_cache_max_models,
        max_bytes=settings.model_cache_max_bytes,
    )
    rt = Runtime(settings, jobs, models, os.getpid())
    # Beaten from this process (a prefork child's claims die with the child), before any claim is taken.
    start_liveness(jobs.store, rt.worker_id, settings.worker_heartbeat_s, lambda job_id: requeue(rt, job_id))
    return rt


def requeue(rt: Runtime, job_id: str) -> None:
    """Send a job whose worker died to the queue again (unless it finished meanwhile)."""
    job = rt.jobs.get(job_id)
    if job is not None and job.status not in TERMINAL_STATUSES:
        send_job(rt.celery, rt.settings, job)


def look_up(rt: Runtime, job_id: str) -> Job | None:
    """The job's record; None (with a warning) when it is gone (expired).

    A task's first look, one read: a finished job (a batch companion's own message, a redelivery) ends
    its task here, and an unfinished one is looked at again by :func:`resume` once claimed.
    """
    job = rt.jobs.get(job_id)
    if job is None:
        log.warning("job %s no longer exists; dropping its task", job_id)
    return job


def resume(rt: Runtime, job_id: str) -> tuple[Job | None, bool]:
    """The job and whether it still needs work.

    Gone (expired): ``(None, False)``. Finished, or its result already stored (a
    redelivery after the result was written, or an equal job computed it; the job is
    then marked succeeded): ``(job, False)``. Otherwise ``(job, True)``.
    """
    job = look_up(rt, job_id)
    if job is None:
        return None, False
    if job.status in TERMINAL_STATUSES:
        return job, False
    cached = rt.jobs.result(job.content_key)
    if cached is not None:
        return rt.jobs.succeed(job, cached), False
    return job, True
