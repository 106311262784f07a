"""The one Celery app factory, the task names and the queues: shared by the API and the workers.

Celery is a queue only here: job state and results live in our store
(:mod:`classlens.core.jobs`), so results are ignored. The API enqueues by task *name*
(:func:`enqueue`) and never imports :mod:`worker`; only a worker asks for the task
code (``include_tasks=True``).

Without ``REDIS_URL`` the broker is a folder under ``data_dir/broker``: kombu's filesystem
transport with atomic writes and takes (:mod:`classlens.core.embedded_broker`); the embedded mode
needs nothing but Python.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery

from classlens.core import embedded_broker
from classlens.core.contract import Job
from classlens.core.settings import Settings

EXPLAIN_TASK = "classlens.explain"
AUDIT_TASK = "classlens.audit"
ANALYSIS_TASK = "classlens.analyse.run"
MODEL_ADD_TASK = "classlens.models.add"

EXPLAIN_QUEUE = "gpu"
AUDIT_QUEUE = "audits"
ANALYSIS_QUEUE = "analyses"
# Registrations (POST /v1/models) have a queue of their own, which every worker consumes by default:
# on the analyses queue one would wait behind half-hour analyses, and a queue of its own lets an
# operator give registrations to a CPU-only worker that shares the store roots (--queues=models).
MODELS_QUEUE = "models"
ALL_QUEUES = (EXPLAIN_QUEUE, AUDIT_QUEUE, ANALYSIS_QUEUE, MODELS_QUEUE)

TASK_ROUTES = {
    EXPLAIN_TASK: {"queue": EXPLAIN_QUEUE},
    AUDIT_TASK: {"queue": AUDIT_QUEUE},
    "classlens.analyse.*": {"queue": ANALYSIS_QUEUE},
    "classlens.models.*": {"queue": MODELS_QUEUE},
}


# Redis hands an unacknowledged message out again after this long. Not tied to the longest task:
# a job still running then is claimed by its live worker, so the second delivery returns at once
# (classlens.core.leases). It bounds the one case claims cannot see: a worker that died after taking a
# message and before claiming its job.
REDELIVER_AFTER_S = 300


def broker_folder(settings: Settings) -> Path:
    """Where the embedded broker keeps its messages (one file per message)."""
    return settings.data_dir / "broker"


def _broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    if settings.redis_url:
        return settings.redis_url, {"visibility_timeout": REDELIVER_AFTER_S}
    folder = broker_folder(settings)
    for sub in ("queue", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": settings.embedded_poll_s,
    }
    return f"{embedded_broker.SCHEME}://", options


def create_celery(settings: Settings, *, include_tasks: bool = False) -> Celery:
    """A Celery app configured from settings; with ``include_tasks`` it also registers the worker's tasks."""
    url, transport_options = _broker(settings)
    app = Celery("classlens", broker=url, include=["worker.tasks"] if include_tasks else [])
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # Sending rides through a broker restart of a few seconds, as the store does (classlens.core.store).
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 5, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 1.0},
        result_backend=None,
        task_ignore_result=True,
        # JSON only: a message can never carry pickled code.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        # A job is acknowledged when done, so a crashed worker's job is redelivered (tasks are idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_routes=TASK_ROUTES,
        task_default_queue=EXPLAIN_QUEUE,
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        # The embedded broker has no fan-out worth paying for: our own heartbeat tells /readyz a worker lives.
        worker_enable_remote_control=bool(settings.redis_url),
        worker_send_task_events=False,
    )
    verify = _verified_tls(url)
    if verify is not None:
        app.conf.broker_use_ssl = verify
    return app


def _verified_tls(url: str) -> dict[str, Any] | None:
    """TLS options for a ``rediss://`` broker URL that does not say how to check the server's certificate.

    kombu would then connect without checking it (it logs a warning and uses ``CERT_NONE``), while
    redis-py, hence the store, checks it by default: the broker must not be the weaker link, so it
    checks too. A URL's own ``ssl_cert_reqs`` (and ``ssl_ca_certs``...) is left as it is.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def enqueue(
    app: Celery, task_name: str, job_id: str, *, soft_time_limit_s: int | None = None, time_limit_s: int | None = None
) -> None:
    """Send a task by name with the job id as its only argument (images travel by store key).

    Time limits given here override the app's defaults for this one message: audits and
    analyses need longer ones than explanations, and the API (which knows the settings) is where they are known.
    """
    options: dict[str, Any] = {}
    if soft_time_limit_s is not None:
        options["soft_time_limit"] = soft_time_limit_s
    if time_limit_s is not None:
        options["time_limit"] = time_limit_s
    app.send_task(task_name, args=[job_id], **options)


def send_job(app: Celery, settings: Settings, job: Job) -> None:
    """Queue ``job`` again by its kind, with the limits its route gives it (the reaper's way back into the queue)."""
    if job.kind == "explanation":
        enqueue(app, EXPLAIN_TASK, job.id)
        return
    task, soft_s, hard_s = {
        "audit": (AUDIT_TASK, settings.audit_soft_time_limit_s, settings.audit_time_limit_s),
        "analysis": (ANALYSIS_TASK, settings.analysis_soft_time_limit_s, settings.analysis_time_limit_s),
        "model": (MODEL_ADD_TASK, settings.model_add_soft_time_limit_s, settings.model_add_time_limit_s),
    }[job.kind]
    enqueue(app, task, job.id, soft_time_limit_s=soft_s, time_limit_s=hard_s)


def queue_depths(app: Celery, queues: tuple[str, ...] = ALL_QUEUES) -> dict[str, int]:
    """Messages waiting per queue (not counting those a worker holds); queues that cannot be read are left out."""
    depths: dict[str, int] = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue in queues:
            try:
                _, count, _ = channel.queue_declare(queue=queue, passive=True)
            except Exception:  # a queue nobody declared yet, or a broker hiccup: no figure rather than an error
                continue
            depths[queue] = int(count)
    return depths
