"""Per-key quotas: a request rate (Flask-Limiter) and a cap on jobs in flight; and submitting as the caller.

Both apply only while authentication is on, since they are counted per API key: the embedded
localhost default has one caller and no limit. Both answer 429 problem+json with ``Retry-After``.

- The rate (``CLASSLENS_RATE_LIMIT``, or a key's ``rate_limit``) counts every request of a key
  to every protected route together (an application-wide limit keyed by the key's id), in Redis
  when ``REDIS_URL`` is set, so that every API process shares one count, else in memory. Probes
  and the contract are exempt, and so are refused requests (a 401 happens before the count).
- The cap (``CLASSLENS_MAX_JOBS_IN_FLIGHT``, or a key's ``max_in_flight``) is on jobs queued or
  running: a client that polls slowly may not pile up work. Each key's unfinished jobs are listed
  in the store (``owned:<key id>``), pruned of finished ones at each submission; a short lock per
  key (``quota-lock:<key id>``) makes check-and-submit one step, so concurrent submissions of one
  key cannot both take the last slot.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, request
from flask_limiter import Limiter

from classlens.core import keys
from classlens.core.contract import TERMINAL_STATUSES, Job
from classlens.core.jobs import Submission
from service.app import Services
from service.auth import PUBLIC_ENDPOINTS, caller
from service.errors import Problem

LOCK_TTL_S = 10.0
# After a refusal for jobs in flight: a short job takes about this long, so this is when a slot may be free.
IN_FLIGHT_RETRY_S = 5


def install_rate_limits(app: Flask, parts: Services) -> Limiter | None:
    """Flask-Limiter over ``app``, keyed by the caller's key; None when authentication is off (no keys to count)."""
    if not parts.auth.enabled:
        return None
    settings = parts.settings

    def key_id() -> str:
        key = caller()
        return key.id if key is not None else "anonymous"

    def limit() -> str:
        key = caller()
        return key.rate_limit if key is not None and key.rate_limit else settings.rate_limit

    def exempt() -> bool:
        return request.endpoint in PUBLIC_ENDPOINTS or caller() is None

    return Limiter(
        key_id,
        app=app,
        application_limits=[limit],
        application_limits_exempt_when=exempt,
        storage_uri=settings.redis_url or "memory://",
        strategy="fixed-window",
        headers_enabled=True,
        key_prefix="classlens-rate",
    )


def _unfinished(parts: Services, ids: list[str]) -> list[str]:
    """The ids of ``ids`` whose jobs are queued or running (the records read in one trip)."""
    jobs = parts.jobs.get_many(ids)
    return [
        job_id for job_id, job in zip(ids, jobs, strict=True) if job is not None and job.status not in TERMINAL_STATUSES
    ]


@contextmanager
def _locked(parts: Services, key_id: str) -> Iterator[None]:
    lock, token = keys.QUOTA_LOCK + key_id, uuid.uuid4().hex.encode()
    deadline = time.monotonic() + LOCK_TTL_S
    while not parts.store.set_if_absent(lock, token, LOCK_TTL_S):
        if time.monotonic() > deadline:  # a holder that died: its lock lapses with its TTL
            break
        time.sleep(0.01)
    try:
        yield
    finally:
        parts.store.delete_if(lock, token)  # only our own: a lock that lapsed may be another request's now


@contextmanager
def in_flight_slot(parts: Services) -> Iterator[Callable[[Job], None]]:
    """Hold the caller's slot while a job is submitted; yields the function that records the job submitted.

    A 429 ``too_many_jobs`` when the caller already has its cap of jobs queued or running.
    """
    key = caller()
    if key is None:
        yield lambda job: None
        return
    cap = key.max_in_flight or parts.settings.max_jobs_in_flight
    listed = keys.OWNED + key.id
    with _locked(parts, key.id):
        raw = parts.store.get(listed)
        ids = _unfinished(parts, json.loads(raw) if raw else [])
        if len(ids) >= cap:
            parts.store.set(listed, json.dumps(ids).encode(), parts.settings.result_ttl_s)
            raise Problem(
                429,
                "Too many jobs in flight",
                f"key {key.id!r} has {len(ids)} jobs queued or running (at most {cap}); "
                "wait for one to finish, then submit again",
                problem="too_many_jobs",
                headers={"Retry-After": str(IN_FLIGHT_RETRY_S)},
                in_flight=len(ids),
                limit=cap,
            )
        submitted: list[Job] = []
        yield submitted.append
        ids += [job.id for job in submitted if job.status not in TERMINAL_STATUSES]
        parts.store.set(listed, json.dumps(ids).encode(), parts.settings.result_ttl_s)


def refuses_nothing() -> bool:
    """Whether :func:`submit` can refuse nothing for the current caller: without a key there is no cap to reach."""
    return caller() is None


def submit(parts: Services, **fields: Any) -> Submission:
    """:meth:`JobStore.submit` as the caller: the job is owned by the caller's key and counts against its cap."""
    with in_flight_slot(parts) as record:
        key = caller()
        submission = parts.jobs.submit(owner=key.id if key is not None else None, **fields)
        record(submission.job)
    return submission


def create(parts: Services, **fields: Any) -> Job:
    """:meth:`JobStore.create` as the caller (registering a model)."""
    with in_flight_slot(parts) as record:
        key = caller()
        job = parts.jobs.create(owner=key.id if key is not None else None, **fields)
        record(job)
    return job
