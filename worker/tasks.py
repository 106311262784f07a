"""The Celery tasks: thin. Read the job, decode the image, call the lens, store the result.

Tasks take the job id only; the image is read from the store by its key, and the result
goes back to the store under its content key (:class:`classlens.core.jobs.JobStore`). They are
idempotent: a redelivered job whose result exists is just marked succeeded. Every failure
is recorded in the job with a title and a detail a person can act on; none is retried,
since the same input would fail the same way.

Per process state (settings, store, catalog, loaded models) is built lazily on first use,
after the worker has forked, so models load once per process and CUDA is never
initialised in a parent.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from celery import Celery, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from pydantic import ValidationError

from classlens.core import stats
from classlens.core.batching import BatchQueue
from classlens.core.contract import (
    TERMINAL_STATUSES,
    AnalysisRequest,
    AnalysisResult,
    AuditImage,
    AuditManifest,
    AuditResult,
    AuditRow,
    ExplainRequest,
    Job,
    ModelRegistration,
)
from classlens.core.images import ImageError, decode_image
from classlens.core.jobs import JobStore
from classlens.core.leases import new_worker_id, start_liveness
from classlens.core.queue import ANALYSIS_TASK, AUDIT_TASK, EXPLAIN_TASK, MODEL_ADD_TASK, create_celery, send_job
from classlens.core.settings import Settings
from classlens.core.store import StoreError, open_store
from model_store.artifacts import ArtifactError
from model_store.catalog import Catalog, ModelChangedError, ModelDisabledError, ModelEntry, ModelNotFoundError
from model_store.manifest import ManifestError
from model_store.sources import ModelSources, RegisterOptions
from worker.analyses.run import AnalysisError, run_analysis
from worker.audits import Explained, aggregate, audit_row, explain_batch, relevance_layer
from worker.lens.explain import ExplainError
from worker.lens.vit import UnsupportedModelError
from worker.model_loader import ModelLoadError
from worker.registration import RegistrationError, register
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


_settings: Settings | None = None
_runtime: Runtime | None = None


def configure(settings: Settings) -> None:
    """Use these settings instead of reading the environment (the ``classlens worker`` command calls this)."""
    global _settings, _runtime
    _settings, _runtime = settings, None


def runtime() -> Runtime:
    """This process's runtime, created on first use (and again in a forked child)."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = _settings or Settings()
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
        rt = _runtime = Runtime(settings, jobs, models, os.getpid())
        # Beaten from this process (a prefork child's claims die with the child), before any claim is taken.
        start_liveness(jobs.store, rt.worker_id, settings.worker_heartbeat_s, lambda job_id: _requeue(rt, job_id))
    return _runtime


def _requeue(rt: Runtime, job_id: str) -> None:
    """Send a job whose worker died to the queue again (unless it finished meanwhile)."""
    job = rt.jobs.get(job_id)
    if job is not None and job.status not in TERMINAL_STATUSES:
        send_job(rt.celery, rt.settings, job)


def _surviving_store_outages(rt: Runtime, job_id: str, run: Callable[[], Job | None]) -> Job | None:
    """``run()``, started again from the top while the store is unreachable, for up to the soft time limit.

    The message stays unacknowledged meanwhile. Before each new try, the batch companions this worker
    held are queued again and its claims dropped: their own messages may have been acknowledged
    already (they found the job claimed by a live worker), so nobody else would run them. A blip of
    Redis thus delays the jobs this worker holds instead of stranding them (work is idempotent: a job
    whose result was stored before the blip is only marked succeeded, a duplicate message finds it done).
    """
    deadline = time.monotonic() + rt.settings.task_soft_time_limit_s
    delay_s = 0.25
    claims = rt.batches.claims
    claims.recent.clear()
    while True:
        try:
            return run()
        except StoreError as error:
            if time.monotonic() > deadline:
                raise
            log.warning("the store is unreachable (%s); job %s starts again once it answers", error, job_id)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)
            try:
                # Claimed in the try that failed, whether still held or already released.
                for other in sorted((claims.recent | claims.held) - {job_id}):
                    _requeue(rt, other)
                    rt.batches.release([other])
                rt.batches.release([job_id])
                claims.recent.clear()
            except Exception as still_away:  # the store or the broker: the next try hands them over again
                log.warning("could not hand back the jobs of job %s's batch yet: %s", job_id, still_away)


class InputExpired(LookupError):
    """An uploaded image or list of images is no longer in the store (its TTL ran out before the job ran)."""


# Failures that are the request's or the model's fault, with the title the job gets.
_EXPECTED: tuple[tuple[type[BaseException], str], ...] = (
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


def _failure_title(error: BaseException) -> str | None:
    for kind, title in _EXPECTED:
        if isinstance(error, kind):
            return title
    return None


def _record_failure(rt: Runtime, job: Job, error: Exception) -> Job:
    """Mark the job failed with a title a person can act on (an unexpected error is logged, too)."""
    title = _failure_title(error)
    if title is None:
        log.exception("job %s failed unexpectedly", job.id)
        title, detail = "Internal error", f"{type(error).__name__}: {error}"
    else:
        detail = getattr(error, "detail", None) or str(error)
    return rt.jobs.fail(job, title, detail)


def _resume(rt: Runtime, job_id: str) -> tuple[Job | None, bool]:
    """The job and whether it still needs work.

    Gone (expired): ``(None, False)``. Finished, or its result already stored (a
    redelivery after the result was written, or an equal job computed it; the job is
    then marked succeeded): ``(job, False)``. Otherwise ``(job, True)``.
    """
    job = rt.jobs.get(job_id)
    if job is None:
        log.warning("job %s no longer exists; dropping its task", job_id)
        return None, False
    if job.status in TERMINAL_STATUSES:
        return job, False
    cached = rt.jobs.result(job.content_key)
    if cached is not None:
        return rt.jobs.succeed(job, cached), False
    return job, True


def explain_job(rt: Runtime, job_id: str) -> Job | None:
    """Run one explanation job to a terminal status; None when the job record is gone (expired).

    With ``batch_max > 1`` the job is explained together with other queued jobs of the same
    model and parameters, in one forward pass (:mod:`classlens.core.batching`).
    """
    job, needs_work = _resume(rt, job_id)
    if job is None or not needs_work:
        return job
    batches = rt.batches
    if not batches.claim(job.id):
        # A live worker holds it (in its batch, or a second delivery of its message): that worker
        # finishes it, or, should it die, its claim is abandoned and the job queued again. Never wait.
        return job
    others: list[Job] = []
    try:
        job, needs_work = _resume(rt, job.id)  # it may have finished between the first look and the claim
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
    job, needs_work = _resume(rt, job_id)
    return job if needs_work else None


def _explain_together(rt: Runtime, jobs: list[Job]) -> list[Job]:
    """Explain the images of ``jobs`` (one model, one set of parameters) in one forward pass.

    Each job ends on its own terms: an image that cannot be decoded fails its job only;
    a failure of the pass itself fails every job of the batch, each with the reason.
    """
    store = rt.jobs
    started = time.monotonic()
    running = [store.start(job) for job in jobs]
    finished: dict[str, Job] = {}
    ready, images = [], []
    for job in running:
        try:
            images.append(_job_image(rt, job))
            ready.append(job)
        except StoreError:
            raise  # not the job's fault: the task runs it again once the store answers
        except Exception as error:
            finished[job.id] = _record_failure(rt, job, error)
    explanations = []
    try:
        if ready:
            request = ExplainRequest.model_validate(ready[0].parameters)
            model = rt.models.get(ready[0].model, fingerprint=ready[0].fingerprints.get(ready[0].model))
            ready, images = _same_model(rt, ready, images, model.entry, finished)
            explanations = model.explain(images, request) if ready else []
    except SoftTimeLimitExceeded:
        detail = f"the explanation took longer than {rt.settings.task_soft_time_limit_s} s"
        finished |= {job.id: store.fail(job, "Time limit exceeded", detail) for job in ready}
    except StoreError:
        raise
    except Exception as error:
        finished |= {job.id: _record_failure(rt, job, error) for job in ready}
    else:
        for job, explanation in zip(ready, explanations, strict=True):
            batched = job.model_copy(update={"batch_size": len(ready)})
            finished[job.id] = store.succeed(batched, explanation.model_dump_json().encode())
            for target in explanation.targets:
                stats.record_emergence(store.store, model=job.model, layer=target.emergence_layer)
    duration_s = time.monotonic() - started
    for job in running:
        done = finished[job.id]
        stats.record_job(store.store, kind=done.kind, model=done.model, status=done.status, duration_s=duration_s)
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
            finished[job.id] = _record_failure(rt, job, error)
    return [job for job, _ in keep], [image for _, image in keep]


def _job_image(rt: Runtime, job: Job) -> Image.Image:
    if job.image_key is None:
        raise ExplainError("the job has no image")
    data = rt.jobs.image(job.image_key)
    if data is None:
        raise ExplainError("the uploaded image has expired; submit it again")
    return decode_image(data, max_pixels=rt.settings.max_image_pixels)


@shared_task(name=EXPLAIN_TASK, ignore_result=True)
def explain_task(job_id: str) -> None:
    """``classlens.explain(job_id)``: explain the job's image; the outcome is in the job record."""
    rt = runtime()
    _surviving_store_outages(rt, job_id, lambda: explain_job(rt, job_id))


def _run_batch_job(
    rt: Runtime, job_id: str, noun: str, soft_limit_s: int, compute: Callable[[Job], bytes]
) -> Job | None:
    """Run one job over many images (an audit, an analysis) to a terminal status; None when the record is gone.

    Idempotent like :func:`explain_job`: a redelivered job whose result exists is just marked
    succeeded; one redelivered mid-way (its worker died) starts again from the beginning.
    ``compute`` returns the result JSON and may record progress on the way, so the record is
    read again before it is finished.
    """
    jobs = rt.jobs
    job, needs_work = _resume(rt, job_id)
    if job is None or not needs_work:
        return job
    if not rt.batches.claim(job_id):
        return job  # a live worker runs it (see explain_job)
    try:
        job, needs_work = _resume(rt, job_id)
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
            job = _record_failure(rt, jobs.get(job.id) or job, error)
        else:
            job = jobs.succeed(jobs.get(job.id) or job, result)
        stats.record_job(
            jobs.store, kind=job.kind, model=job.model, status=job.status, duration_s=time.monotonic() - started
        )
        return job
    finally:
        rt.batches.release([job_id])


def _manifest(rt: Runtime, job: Job, noun: str) -> AuditManifest:
    data = rt.jobs.manifest(str(job.parameters.get("manifest_key", "")))
    if data is None:
        raise InputExpired(f"the {noun}'s list of images has expired; submit the {noun} again")
    return AuditManifest.model_validate_json(data)


def _decode(rt: Runtime, items: Sequence[AuditImage], noun: str) -> list[Image.Image]:
    """The images of ``items`` read from the store and decoded; an error names the file."""
    images = []
    for item in items:
        payload = rt.jobs.image(item.image_key)
        if payload is None:
            raise InputExpired(f"{item.file}: the uploaded image has expired; submit the {noun} again")
        try:
            images.append(decode_image(payload, max_pixels=rt.settings.max_image_pixels))
        except ImageError as error:
            raise ImageError(error.problem, f"{item.file}: {error.detail}") from error
    return images


def audit_job(rt: Runtime, job_id: str) -> Job | None:
    """Run one audit job to a terminal status; None when the job record is gone (expired)."""
    return _run_batch_job(
        rt, job_id, "audit", rt.settings.audit_soft_time_limit_s, lambda job: _audit(rt, job).model_dump_json().encode()
    )


def _audit(rt: Runtime, job: Job) -> AuditResult:
    """Explain the audit's images batch by batch (progress after each), then build rows and aggregates."""
    manifest = _manifest(rt, job, "audit")
    request = ExplainRequest.model_validate(job.parameters["explain"])
    model = rt.models.get(job.model, fingerprint=job.fingerprints.get(job.model))
    rows: list[AuditRow] = []
    first: Explained | None = None
    size = rt.settings.audit_batch_size
    for start in range(0, len(manifest.images), size):
        batch = manifest.images[start : start + size]
        images = _decode(rt, batch, "audit")
        explained = explain_batch(model, images, [item.label for item in batch], request)
        first = first or explained[0]
        rows.extend(audit_row(item, found, request, model.labels) for item, found in zip(batch, explained, strict=True))
        job = rt.jobs.progress(job, len(rows))
    if first is None:
        raise ExplainError("the audit has no images")
    explanation = first.explanation
    layer = relevance_layer(explanation, next(iter(first.targets.values())))
    return AuditResult(
        model=explanation.model,
        layers=explanation.layers,
        grid=explanation.grid,
        map_kind=explanation.map_kind,
        relevance_layer=int(layer),
        rows=rows,
        aggregates=aggregate(rows, model.labels, explanation.layers, explanation.grid),
    )


@shared_task(name=AUDIT_TASK, ignore_result=True)
def audit_task(job_id: str) -> None:
    """``classlens.audit(job_id)``: explain and summarise the audit's images; the outcome is in the job record."""
    rt = runtime()
    _surviving_store_outages(rt, job_id, lambda: audit_job(rt, job_id))


def analysis_job(rt: Runtime, job_id: str) -> Job | None:
    """Run one analysis job to a terminal status; None when the job record is gone (expired)."""
    return _run_batch_job(rt, job_id, "analysis", rt.settings.analysis_soft_time_limit_s, lambda job: _analyse(rt, job))


def _analyse(rt: Runtime, job: Job) -> bytes:
    """Load the model(s) and the images, run the analysis with progress, store its figures; the result JSON."""
    manifest = _manifest(rt, job, "analysis")
    request = AnalysisRequest.model_validate(job.parameters["analysis"])
    references = [job.model, *([request.compare_to] if request.compare_to else [])]
    # Any registered model (CKA compares a ViT with a CNN, say): run_analysis refuses what a kind cannot use.
    models = [
        rt.models.get(reference, require_vit=False, fingerprint=job.fingerprints.get(reference))
        for reference in references
    ]
    images = _decode(rt, manifest.images, "analysis")
    known = [item.label for item in manifest.images]
    labels = np.array(known, dtype=np.int64) if known and None not in known else None
    current = job

    def report(done: int, total: int) -> None:
        nonlocal current
        if (done, total) != (current.progress.done, current.progress.total):
            current = rt.jobs.progress(current, done, total)

    outcome = run_analysis(request, models, images, labels, report)
    figures = {name: rt.jobs.put_figure(data) for name, data in outcome.figures.items()}
    result = AnalysisResult(
        kind=request.kind,
        models=[model.ref for model in models],
        images=len(images),
        data=outcome.data,
        figures=figures,
    )
    return result.model_dump_json().encode()


@shared_task(name=ANALYSIS_TASK, ignore_result=True)
def analysis_task(job_id: str) -> None:
    """``classlens.analyse.run(job_id)``: run the job's analysis; the outcome (and figures) are in the store."""
    rt = runtime()
    _surviving_store_outages(rt, job_id, lambda: analysis_job(rt, job_id))


# -- registering an uploaded model (POST /v1/models) ------------------------------------------------------


def upload_folder(settings: Settings, job_id: str) -> Path:
    """Where the API left the files of registration ``job_id`` (``data_dir`` is shared by API and workers)."""
    return settings.upload_dir / job_id


def model_add_job(rt: Runtime, job_id: str) -> Job | None:
    """Register the job's upload into the user's store root; its folder is removed whatever happens.

    Not idempotent like the others (registering has an effect): a redelivered registration whose
    first run put the version in place fails as "exists" unless it was sent with ``overwrite``.
    """
    folder = upload_folder(rt.settings, job_id)
    job: Job | None = None
    try:
        job = _run_batch_job(
            rt, job_id, "registration", rt.settings.model_add_soft_time_limit_s, lambda job: _register(rt, job, folder)
        )
        return job
    finally:
        # Not while another live worker registers it (this is a second delivery): it still reads the files.
        if job is None or job.status in TERMINAL_STATUSES:
            shutil.rmtree(folder, ignore_errors=True)
        _sweep_uploads(rt)


def _register(rt: Runtime, job: Job, folder: Path) -> bytes:
    if not folder.is_dir():
        raise InputExpired("the uploaded files are no longer there; upload the model again")
    options = RegisterOptions.model_validate(job.parameters["options"])
    try:
        sources = ModelSources.locate(folder)
    except ManifestError as error:  # no weights, or several: the upload's fault, said as registration says it
        raise RegistrationError(str(error)) from error
    entry = register(sources, options, rt.settings.user_model_dir)
    rt.models.catalog.refresh()  # this worker serves it from its next job on
    manifest = entry.manifest
    result = ModelRegistration(
        reference=manifest.reference,
        name=manifest.name,
        version=manifest.version,
        framework=manifest.framework,
        architecture=manifest.architecture,
        classes=manifest.labels.count,
        weights_sha256=manifest.weights.sha256,
        structure=None if manifest.structure is None else manifest.structure.model_dump(mode="json"),
        result_fingerprint=entry.result_fingerprint,
    )
    return result.model_dump_json().encode()


def _sweep_uploads(rt: Runtime) -> None:
    """Remove upload folders whose job is gone or finished (their task never ran), once they are old.

    Old: untouched for longer than a registration may run, so that a folder the API is still
    writing (its job record comes after the files) is never taken.
    """
    root = rt.settings.upload_dir
    if not root.is_dir():
        return
    cutoff = time.time() - rt.settings.model_add_time_limit_s
    for folder in root.iterdir():
        try:
            if folder.stat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        job = rt.jobs.get(folder.name)
        if job is None or job.status in TERMINAL_STATUSES:
            shutil.rmtree(folder, ignore_errors=True)


@shared_task(name=MODEL_ADD_TASK, ignore_result=True)
def model_add_task(job_id: str) -> None:
    """``classlens.models.add(job_id)``: register the uploaded model; the outcome is in the job record."""
    # Not run again on a store outage: its upload folder is removed when a try ends (registering has effects).
    model_add_job(runtime(), job_id)
