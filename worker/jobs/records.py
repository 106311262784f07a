"""A job's records written through :meth:`~classlens.core.store.Store.writes`, with its other bookkeeping.

The same writes as :meth:`JobStore.start <classlens.core.jobs.JobStore.start>` and
:meth:`JobStore.succeed <classlens.core.jobs.JobStore.succeed>` (the result under the content key,
the record, the notice that wakes long polls, the in-flight claim dropped), in the same order, but
queued on a block of writes: a job's success, its counters and its monitoring window then reach the
store in one round trip, and a batch's in one for all its jobs. tests/test_worker_costs.py checks
that both leave the store alike.
"""

from __future__ import annotations

import time
from typing import Any

from classlens.core import keys
from classlens.core.contract import Job, Progress
from classlens.core.jobs import JobStore
from classlens.core.store import Writes


def update(writes: Writes, jobs: JobStore, job: Job, **changes: Any) -> Job:
    """:meth:`JobStore.update <classlens.core.jobs.JobStore.update>`: the changed record, and its notice."""
    updated = job.model_copy(update={**changes, "updated_at": time.time()})
    writes.set(keys.JOB + job.id, updated.model_dump_json().encode(), jobs.ttl_s)
    writes.notify(keys.JOB + job.id)
    return updated


def start(writes: Writes, jobs: JobStore, job: Job) -> Job:
    return update(writes, jobs, job, status="running", started_at=time.time())


def succeed(writes: Writes, jobs: JobStore, job: Job, result: bytes, **changes: Any) -> Job:
    """The result under the content key (the cache), then the finished record, then the claim on the key dropped.

    ``changes``: other fields of the record set with it (a batch's size), in the same copy.
    """
    writes.set(keys.RESULT + job.content_key, result, jobs.ttl_s)
    finished = update(
        writes,
        jobs,
        job,
        status="succeeded",
        finished_at=time.time(),
        progress=Progress(done=job.progress.total, total=job.progress.total),
        error=None,
        **changes,
    )
    writes.delete_if(keys.INFLIGHT + job.content_key, job.id.encode())
    return finished
