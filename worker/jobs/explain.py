"""Explanation jobs: one image each, explained together with queued jobs of the same model and parameters.

With ``batch_max > 1`` a job's worker takes companions (other queued jobs of the same model and
parameters, :mod:`classlens.core.batching`) and explains all their images in one forward pass;
each job still ends on its own terms.

The store is asked as little as the work allows: the batch's jobs are started in one round trip,
and their successes, counters and monitoring signals are written in one more
(:meth:`~classlens.core.store.Store.writes`, on which :class:`~classlens.core.jobs.JobStore` queues them).
"""

from __future__ import annotations

import time

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from classlens.core import monitoring, stats
from classlens.core.contract import TERMINAL_STATUSES, ExplainRequest, Explanation, Job
from classlens.core.images import decode_image
from classlens.core.store import StoreError
from model_store.catalog import ModelChangedError, ModelEntry
from worker.jobs.failures import record_failure
from worker.jobs.runtime import Runtime, look_up, resume
from worker.lens.explain import ExplainError


def explain_job(rt: Runtime, job_id: str) -> Job | None:
    """Run one explanation job to a terminal status; None when the job record is gone (expired).

    With ``batch_max > 1`` the job is explained together with other queued jobs of the same
    model and parameters, in one forward pass (:mod:`classlens.core.batching`).
    """
    job = look_up(rt, job_id)
    if job is None or job.status in TERMINAL_STATUSES:
        return job
    batches = rt.batches
    if not batches.claim(job.id):
        # A live worker holds it (in its batch, or a second delivery of its message): that worker
        # finishes it, or, should it die, its claim is abandoned and the job queued again. Never wait.
        return job
    others: list[Job] = []
    try:
        job, needs_work = resume(rt, job.id)  # finished since the first look, or its result already stored
        if job is None or not needs_work:
            return job
        if rt.settings.batch_max > 1:
            others = batches.companions(
                job, rt.settings.batch_max - 1, rt.settings.batch_wait_ms / 1000, lambda other: _needs_work(rt, other)
            )
        return _explain_together(rt, [job, *others])[0]
    finally:
        batches.release([job_id, *(other.id for other in others)])


def _needs_work(rt: Runtime, job_id: str) -> Job | None:
    job, needs_work = resume(rt, job_id)
    return job if needs_work else None


def _explain_together(rt: Runtime, jobs: list[Job]) -> list[Job]:
    """Explain the images of ``jobs`` (one model, one set of parameters) in one forward pass.

    Each job ends on its own terms: an image that cannot be decoded fails its job only;
    a failure of the pass itself fails every job of the batch, each with the reason.
    """
    store = rt.jobs
    started = time.monotonic()
    with store.store.writes() as writes:
        running = [store.start(job, writes=writes) for job in jobs]
    finished: dict[str, Job] = {}
    ready, images = [], []
    for job in running:
        try:
            images.append(_job_image(rt, job))
            ready.append(job)
        except StoreError:
            raise  # not the job's fault: the task runs it again once the store answers
        except Exception as error:
            finished[job.id] = record_failure(rt, job, error)
    explained: list[tuple[Job, Explanation]] = []
    try:
        if ready:
            request = ExplainRequest.model_validate(ready[0].parameters)
            model = rt.models.get(ready[0].model, fingerprint=ready[0].fingerprints.get(ready[0].model))
            ready, images = _same_model(rt, ready, images, model.entry, finished)
            explained = list(zip(ready, model.explain(images, request) if ready else [], strict=True))
    except SoftTimeLimitExceeded:
        detail = f"the explanation took longer than {rt.settings.task_soft_time_limit_s} s"
        finished |= {job.id: store.fail(job, "Time limit exceeded", detail) for job in ready}
    except StoreError:
        raise
    except Exception as error:
        finished |= {job.id: record_failure(rt, job, error) for job in ready}
    duration_s = time.monotonic() - started
    # Counters first, records last: whoever a record's notice wakes finds the counters already made.
    with store.store.writes() as writes:
        for job, explanation in explained:
            for target in explanation.targets:
                stats.record_emergence(writes, model=job.model, layer=target.emergence_layer)
            monitoring.record(
                writes,
                job.model,
                monitoring.signals(explanation),
                window=rt.settings.drift_window,
                max_classes=rt.settings.metrics_max_classes,
            )
        for job in running:
            status = finished[job.id].status if job.id in finished else "succeeded"  # else: among the explained
            stats.record_job(writes, kind=job.kind, model=job.model, status=status, duration_s=duration_s)
        for job, explanation in explained:
            result = explanation.model_dump_json().encode()
            finished[job.id] = store.succeed(job, result, writes=writes, batch_size=len(explained))
    return [finished[job.id] for job in jobs]


def _same_model(
    rt: Runtime, jobs: list[Job], images: list[Image.Image], entry: ModelEntry, finished: dict[str, Job]
) -> tuple[list[Job], list[Image.Image]]:
    """The jobs (and their images) keyed with ``entry`` as it is; the others fail (submitted before it changed).

    Companions share a model reference and parameters, not necessarily the model's content: one
    submitted before the version was registered again names the old content in its key.
    """
    keep: list[tuple[Job, Image.Image]] = []
    for job, image in zip(jobs, images, strict=True):
        expected = job.fingerprints.get(job.model)
        if expected is None or expected == entry.result_fingerprint:
            keep.append((job, image))
        else:
            error = ModelChangedError(f"{job.model} was registered again after this job was submitted; submit again")
            finished[job.id] = record_failure(rt, job, error)
    return [job for job, _ in keep], [image for _, image in keep]


def _job_image(rt: Runtime, job: Job) -> Image.Image:
    if job.image_key is None:
        raise ExplainError("the job has no image")
    data = rt.jobs.image(job.image_key)
    if data is None:
        raise ExplainError("the uploaded image has expired; submit it again")
    return decode_image(data, max_pixels=rt.settings.max_image_pixels)
