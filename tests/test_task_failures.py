"""A failed job's task is a Celery FAILURE: acknowledged once, never retried, logged without a traceback.

The job's failure is recorded in the store as before; its task then raises ``JobFailed``, so that
Celery, and a monitor such as Flower, count the task as failed rather than succeeded. A real
worker runs in this process (Celery's embedded test worker, solo pool, a Redis broker of its
own database), and Celery's signals say what it decided about each message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun, task_retry

from classlens.core.contract import TERMINAL_STATUSES, ExplainRequest, Job
from classlens.core.jobs import JobStore, content_key
from classlens.core.queue import EXPLAIN_QUEUE, EXPLAIN_TASK, create_celery, enqueue
from classlens.core.settings import Settings
from classlens.core.store import open_store
from model_store.catalog import Catalog
from tests.service_fixtures import TINY_MODEL, sample_png
from worker.jobs.failures import JobFailed
from worker.jobs.runtime import runtime

NOT_AN_IMAGE = b"these bytes are no image"


@pytest.fixture
def settings(tmp_path, tiny_model_root, redis_url) -> Iterator[Settings]:
    url = f"{redis_url}/7"  # a database of its own: no other module's messages in its queues
    redis.Redis.from_url(url).flushdb()
    yield Settings(
        redis_url=url, model_dirs=[tiny_model_root], data_dir=tmp_path / "data", worker_heartbeat_s=0.5, batch_max=1
    )
    redis.Redis.from_url(url).flushdb()


def _submit(settings: Settings, image: bytes, *, send: bool = True) -> Job:
    """An explanation job as the API submits it (its task sent by name unless ``send`` is false)."""
    jobs = JobStore(open_store(settings), ttl_s=3600, inflight_ttl_s=settings.task_time_limit_s)
    entry = Catalog.default(settings.model_roots).resolve(TINY_MODEL)
    parameters = ExplainRequest(top_k=2).model_dump(mode="json")
    image_key = jobs.put_image(image)
    sender = create_celery(settings)
    return jobs.submit(
        kind="explanation",
        model=entry.reference,
        parameters=parameters,
        key=content_key(entry.result_fingerprint, image_key, parameters),
        image_key=image_key,
        enqueue=lambda job: enqueue(sender, EXPLAIN_TASK, job.id) if send else None,
        fingerprints={entry.reference: entry.result_fingerprint},
    ).job


def _finished(jobs: JobStore, job_ids: list[str], timeout_s: float = 60) -> dict[str, Job]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = {job_id: jobs.get(job_id) for job_id in job_ids}
        if all(job is not None and job.status in TERMINAL_STATUSES for job in found.values()):
            return {job_id: job for job_id, job in found.items() if job is not None}
        if time.monotonic() > deadline:
            pytest.fail(f"not finished in time: {[(i, j and j.status) for i, j in found.items()]}")
        time.sleep(0.05)


def test_a_failed_job_is_a_failure_acknowledged_once_and_logged_without_a_traceback(settings, caplog):
    rt = runtime(settings)  # the runtime the worker's tasks use in this process
    app = create_celery(settings, include_tasks=True)
    import worker.tasks  # noqa: F401  (the tasks, registered for this app)

    runs: dict[str, list[str]] = {}  # job id -> the state Celery gave each run of its task
    retries: list[object] = []

    def after_run(args=(), state=None, **_):
        runs.setdefault(args[0], []).append(state)

    def on_retry(**fields):
        retries.append(fields)

    task_postrun.connect(after_run, weak=False)
    task_retry.connect(on_retry, weak=False)
    caplog.set_level(logging.INFO)
    try:
        with start_worker(
            app, pool="solo", loglevel="INFO", perform_ping_check=False, queues=[EXPLAIN_QUEUE], shutdown_timeout=30
        ):
            broken = _submit(settings, NOT_AN_IMAGE)
            fine = _submit(settings, sample_png())
            done = _finished(rt.jobs, [broken.id, fine.id])
    finally:
        task_postrun.disconnect(after_run)
        task_retry.disconnect(on_retry)

    assert done[broken.id].status == "failed"
    assert done[broken.id].error is not None
    assert done[broken.id].error.title == "The image cannot be decoded"
    assert done[fine.id].status == "succeeded"
    # What Celery (and Flower) record: FAILURE for the failed job, SUCCESS for the other, one run each.
    assert runs == {broken.id: ["FAILURE"], fine.id: ["SUCCESS"]}
    assert retries == []
    # Both messages acknowledged (the worker has stopped: one it held unacknowledged would be back in the queue).
    broker = redis.Redis.from_url(settings.redis_url)
    assert broker.llen(EXPLAIN_QUEUE) == 0
    assert broker.hlen("unacked") == 0
    # An expected failure: one line at INFO, no traceback, nothing at ERROR.
    failure = [record for record in caplog.records if broken.id in record.getMessage()]
    assert any("raised expected" in record.getMessage() for record in failure), [r.getMessage() for r in failure]
    assert all(record.exc_info is None for record in failure)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    # The job record is finished once: one failure and one success counted by the workers' stats.
    counted = {
        status: rt.jobs.store.get(f"stats:jobs:explanation:{broken.model}:{status}")
        for status in ("failed", "succeeded")
    }
    assert counted == {"failed": b"1", "succeeded": b"1"}


def test_the_task_of_a_failed_job_ends_in_failure_when_run_eagerly(settings):
    runtime(settings)
    app = create_celery(settings, include_tasks=True)
    import worker.tasks  # noqa: F401

    task = app.tasks[EXPLAIN_TASK]
    broken = _submit(settings, NOT_AN_IMAGE, send=False)
    outcome = task.apply(args=[broken.id])
    assert outcome.state == "FAILURE"
    assert isinstance(outcome.result, JobFailed)
    assert broken.id in str(outcome.result)
    assert "The image cannot be decoded" in str(outcome.result)
    # Run again (a second delivery): the job stays failed, and its task is still a failure.
    assert task.apply(args=[broken.id]).state == "FAILURE"
    fine = _submit(settings, sample_png(), send=False)
    assert task.apply(args=[fine.id]).state == "SUCCESS"
    assert task.apply(args=["0" * 32]).state == "SUCCESS"  # a job gone (expired): nothing to fail
