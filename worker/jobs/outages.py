"""Riding through a store outage: a job is started again from the top once the store answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from classlens.core.contract import Job
from classlens.core.store import StoreError
from worker.jobs.runtime import Runtime, requeue

log = logging.getLogger(__name__)


def surviving_store_outages(rt: Runtime, job_id: str, run: Callable[[], Job | None]) -> Job | None:
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
            # Not again before the claims are handed back: a try that found its own job still claimed
            # by this (live) worker would take it for another's and leave the job running forever.
            while True:
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
                try:
                    # Claimed in the try that failed, whether still held or already released.
                    for other in sorted((claims.recent | claims.held) - {job_id}):
                        requeue(rt, other)
                        rt.batches.release([other])
                    rt.batches.release([job_id])
                    claims.recent.clear()
                    break
                except Exception as still_away:  # the store or the broker: hand them back once it answers
                    if time.monotonic() > deadline:
                        raise error from still_away
                    log.warning("could not hand back the jobs of job %s's batch yet: %s", job_id, still_away)
