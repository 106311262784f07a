"""Job records, content keys and in-flight de-duplication, over any :class:`~classlens.core.store.Store`.

The API and the workers change jobs only through :class:`JobStore`, under the keys of
:mod:`classlens.core.keys`: ``job:<id>`` (the record), ``image:``, ``manifest:`` and
``figure:`` ``<sha256>`` (content-addressed uploads and figures), and ``result:``,
``inflight:`` and ``made-for:`` ``<content key>`` (the cache, the claim on computing it,
and whose submission did), all kept for the result TTL except the claim (the task's hard limit).

A content key names a result by everything it depends on: the lens version
(:data:`classlens.core.contract.LENS_VERSION`), the model's result fingerprint
(:attr:`model_store.catalog.ModelEntry.result_fingerprint`: weights, labels, input,
preprocessing, architecture, structure), the input's digest and the canonical parameters.
Equal requests share one result and one computation, and a result can never answer for
another model, another labelling or an older method.

The API's side reads and writes what one job needs in as few store round trips as the
semantics allow (:meth:`Store.round_trip`, :meth:`Store.get_many`): the cache is looked up
once (result and owner together, and a cache hit's own record saved in that same trip when the
caller made it ahead: :func:`cache_hit_record`), a new job's record, its in-flight claim and its
hand-over claim go in one trip, and a long poll reads the record and the result together.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from classlens.core import contract, keys, leases
from classlens.core.contract import TERMINAL_STATUSES, Job, JobError, JobKind, Progress
from classlens.core.store import Command, Delete, DeleteIf, Get, Set, SetIfAbsent, SetIfFound, Store, Writes

Outcome = Literal["cached", "joined", "queued"]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal parameters give equal text, hence equal keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(model_fingerprint: str, input_sha256: str, parameters: Mapping[str, Any]) -> str:
    """sha256 of the lens version, the model's result fingerprint, the input's digest and the canonical parameters.

    ``model_fingerprint`` is :attr:`~model_store.catalog.ModelEntry.result_fingerprint`, so re-registering
    the same weights with other labels or preprocessing (or under another name) gives other keys. The lens
    version is read when the key is made, not when this module is imported: bumping it retires every
    stored result at once.
    """
    text = "\n".join(
        [f"lens:{contract.LENS_VERSION}", model_fingerprint, input_sha256, canonical_json(dict(parameters))]
    )
    return sha256_hex(text.encode())


def new_job_id() -> str:
    return uuid.uuid4().hex


def _queued(job_id: str, kind: JobKind, model: str, parameters: Mapping[str, Any], key: str, **fields: Any) -> Job:
    """A new job record, queued now."""
    now = time.time()
    return Job(
        id=job_id,
        kind=kind,
        status="queued",
        created_at=now,
        updated_at=now,
        model=model,
        parameters=dict(parameters),
        content_key=key,
        **fields,
    )


def _answered_from_cache(job: Job) -> Job:
    """``job`` (just made by :func:`_queued`) as a cache hit leaves it: succeeded at once, all done."""
    total = job.progress.total
    return job.model_copy(
        update={"status": "succeeded", "finished_at": job.created_at, "progress": Progress(done=total, total=total)}
    )


def cache_hit_record(
    *,
    kind: JobKind,
    model: str,
    parameters: Mapping[str, Any],
    key: str,
    image_key: str | None,
    total: int = 1,
    fingerprints: Mapping[str, str] | None = None,
    owner: str | None = None,
) -> Job:
    """The record :meth:`JobStore.submit` saves for a cache hit with these arguments, made ahead of the look-up.

    Given to :meth:`JobStore.lookup` (``record``), it is saved in the look-up's own trip when the
    result is there, so that a hit costs one round trip instead of two.
    """
    return _answered_from_cache(_new_job(kind, model, parameters, key, image_key, total, fingerprints, owner))


def _new_job(
    kind: JobKind,
    model: str,
    parameters: Mapping[str, Any],
    key: str,
    image_key: str | None,
    total: int,
    fingerprints: Mapping[str, str] | None,
    owner: str | None,
) -> Job:
    """A submission's own record, queued, under a new id (:meth:`JobStore.submit`'s arguments)."""
    return _queued(
        new_job_id(),
        kind,
        model,
        parameters,
        key,
        image_key=image_key,
        progress=Progress(done=0, total=total),
        fingerprints=dict(fingerprints or {}),
        owner=owner,
    )


@dataclass(frozen=True)
class Lookup:
    """What the cache held under a content key when it was looked up: the result, and whose submission made it."""

    result: bytes | None
    made_for: str  # the owner ('' for none) whose submission first computed it
    # The cache hit's record, saved with the look-up (``JobStore.lookup(record=...)``) since the result was there.
    recorded: Job | None = None


@dataclass(frozen=True)
class Submission:
    """What became of a submitted request: a finished job from the cache, a joined one, or a new one."""

    job: Job
    outcome: Outcome
    result: bytes | None = None
    # A cache hit on a result first computed for another owner (another API key).
    foreign: bool = False

    @property
    def cached(self) -> bool:
        """Whether to tell the caller its answer came from the cache.

        Only when the result was computed for the same owner: telling another key ``cached: true``
        would tell it that someone else submitted the same image with the same parameters.
        """
        return self.outcome == "cached" and not self.foreign


class JobStore:
    """Jobs, images and results in a store, with the TTLs from settings."""

    def __init__(self, store: Store, *, ttl_s: float, inflight_ttl_s: float, max_waiters: int | None = None):
        self.store = store
        self.ttl_s = ttl_s
        self.inflight_ttl_s = inflight_ttl_s
        # Long polls hold a server thread each: past this many at once, :meth:`wait` answers at once.
        self._waiters = None if max_waiters is None else threading.BoundedSemaphore(max(max_waiters, 1))
        self._no_waiters = max_waiters == 0

    # -- records -------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._parsed(self.store.get(keys.JOB + job_id))

    def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """:meth:`get` of each id, in order, with the records read in one trip."""
        return [self._parsed(data) for data in self.store.get_many([keys.JOB + job_id for job_id in job_ids])]

    def _parsed(self, data: bytes | None) -> Job | None:
        """A stored record as a job (a follower as its leader stands), or None."""
        if data is None:
            return None
        try:
            job = Job.model_validate_json(data)
        except ValidationError:  # a record from an incompatible version: as good as gone
            return None
        return self._followed(job) if job.follows is not None and job.status not in TERMINAL_STATUSES else job

    def _followed(self, job: Job) -> Job:
        """A follower as its leader stands: the leader's status, times, progress and error, under its own id and owner.

        Read-through rather than copied by the worker, so nothing on the worker side needs to know that
        followers exist; a follower that has caught up with its finished leader is saved so, and so
        outlives it. A leader that vanished unfinished leaves the follower failed (its owner submits again).
        """
        leader = self.get(job.follows) if job.follows else None
        if leader is None:
            if self.result(job.content_key) is not None:
                done = Progress(done=job.progress.total, total=job.progress.total)
                return self.save(
                    job.model_copy(update={"status": "succeeded", "finished_at": time.time(), "progress": done})
                )
            return self.save(
                job.model_copy(
                    update={
                        "status": "failed",
                        "finished_at": time.time(),
                        "error": JobError(
                            title="Job lost", detail="the job computing this result is gone; submit again"
                        ),
                    }
                )
            )
        fields = ("status", "updated_at", "started_at", "finished_at", "progress", "error", "batch_size")
        merged = job.model_copy(update={name: getattr(leader, name) for name in fields})
        return self.save(merged) if merged.status in TERMINAL_STATUSES else merged

    def _join_as(self, owner: str | None, running: Job, fresh: Job) -> Job:
        """The job ``owner`` joins: ``running`` itself when it is theirs, else a record of their own that follows it.

        Another owner must neither learn the running job's id (it would then poll someone else's job)
        nor see it (404 for other keys); its own record shares the computation and the result.
        """
        if running.owner == owner:
            return running
        return self._followed(self.save(fresh.model_copy(update={"follows": running.id})))

    def lookup(self, key: str, *, record: Job | None = None) -> Lookup:
        """The cache under ``key``: its result and whose submission computed it, in one trip.

        ``record`` (:func:`cache_hit_record`) is saved in that same trip, and only if the result is
        there (:class:`~classlens.core.store.SetIfFound`): the hit's record then costs no trip of
        its own, and a miss leaves nothing behind.
        """
        if record is None:
            result, made_for = self.store.get_many([keys.RESULT + key, keys.MADE_FOR + key])
        else:
            saved = SetIfFound(keys.RESULT + key, keys.JOB + record.id, record.model_dump_json().encode(), self.ttl_s)
            result, made_for = self.store.round_trip([saved, Get(keys.MADE_FOR + key)])
        owner = made_for.decode() if made_for is not None else ""
        return Lookup(result, owner, record if record is not None and result is not None else None)

    def save(self, job: Job) -> Job:
        self.store.set(keys.JOB + job.id, job.model_dump_json().encode(), self.ttl_s)
        return job

    def update(self, job: Job, *, writes: Writes | None = None, **changes: Any) -> Job:
        """Save the changed job and wake whoever long-polls it, in one round trip.

        With ``writes``, queued on that block instead, to reach the store with the caller's other
        writes (a worker sends a job's record, result and counters together).
        """
        updated = job.model_copy(update={**changes, "updated_at": time.time()})
        with self._writing(writes) as block:
            block.set(keys.JOB + job.id, updated.model_dump_json().encode(), self.ttl_s)
            block.notify(keys.JOB + job.id)
        return updated

    @contextmanager
    def _writing(self, writes: Writes | None) -> Iterator[Writes]:
        """``writes`` when the caller has a block open; else a block of this call's own."""
        if writes is not None:
            yield writes
            return
        with self.store.writes() as own:
            yield own

    def wait(self, job: Job, seconds: float) -> Job:
        """The job once it is finished, or as it is after ``seconds`` (a long poll, woken by :meth:`update`)."""
        return self.wait_for_result(job, seconds)[0]

    def wait_for_result(self, job: Job, seconds: float) -> tuple[Job, bytes | None]:
        """:meth:`wait`, with the result of a job found succeeded (read with its record), else None.

        None also when the job was finished already on entry: nothing was read, the caller reads it.
        """
        if job.status in TERMINAL_STATUSES or seconds <= 0 or self._no_waiters:
            return job, None
        if self._waiters is None:
            return self._wait(job, seconds)
        if not self._waiters.acquire(blocking=False):
            return self._now(job)  # every long-poll slot is taken: the job as it is now
        try:
            return self._wait(job, seconds)
        finally:
            self._waiters.release()

    def _now(self, job: Job) -> tuple[Job, bytes | None]:
        """The job as it stands and, when it succeeded, its result: one trip (the key is the job's own)."""
        record, result = self.store.get_many([keys.JOB + job.id, keys.RESULT + job.content_key])
        now = self._parsed(record) or job
        return now, result if now.status == "succeeded" else None

    def _wait(self, job: Job, seconds: float) -> tuple[Job, bytes | None]:
        deadline = time.monotonic() + seconds
        # A follower changes only when its leader does: listen to the leader's notices.
        with self.store.listen(keys.JOB + (job.follows or job.id)) as changes:
            job, result = self._now(job)  # read after listening: a change from now on wakes us
            while job.status not in TERMINAL_STATUSES and (remaining := deadline - time.monotonic()) > 0:
                changes.wait(remaining)
                job, result = self._now(job)
        return job, result

    def _put_blob(self, prefix: str, data: bytes) -> str:
        """Store ``data`` under ``<prefix><its sha256>`` (content-addressed) and return the digest."""
        digest = sha256_hex(data)
        self.store.set(prefix + digest, data, self.ttl_s)
        return digest

    def put_image(self, data: bytes) -> str:
        return self._put_blob(keys.IMAGE, data)

    def image(self, digest: str) -> bytes | None:
        return self.store.get(keys.IMAGE + digest)

    def put_manifest(self, data: bytes) -> str:
        """Store an audit's manifest (JSON) under its digest: the job record stays small however many images."""
        return self._put_blob(keys.MANIFEST, data)

    def manifest(self, digest: str) -> bytes | None:
        return self.store.get(keys.MANIFEST + digest)

    def put_figure(self, data: bytes) -> str:
        """Store an analysis' figure (PNG, or the HTML report) under its digest; the result names it by that."""
        return self._put_blob(keys.FIGURE, data)

    def figure(self, digest: str) -> bytes | None:
        return self.store.get(keys.FIGURE + digest)

    def result(self, key: str) -> bytes | None:
        return self.store.get(keys.RESULT + key)

    def put_result(self, key: str, data: bytes) -> None:
        self.store.set(keys.RESULT + key, data, self.ttl_s)

    # -- the API side --------------------------------------------------------------------------------

    def submit(
        self,
        *,
        kind: JobKind,
        model: str,
        parameters: Mapping[str, Any],
        key: str,
        image_key: str | None,
        enqueue: Callable[[Job], None],
        total: int = 1,
        inflight_ttl_s: float | None = None,
        fingerprints: Mapping[str, str] | None = None,
        owner: str | None = None,
        looked_up: Lookup | None = None,
    ) -> Submission:
        """A cached result, the job already computing ``key``, or a new job handed to ``enqueue``.

        The new job's record is saved before it claims ``inflight:<key>`` (``set_if_absent``),
        so whoever reads the claim finds the job. A claim whose job has finished or vanished
        is stale and is taken over, with a compare-and-delete: of two submitters that find the
        same stale claim, one takes it over and the other joins that one's job. If ``enqueue``
        raises, the job is marked failed, the claim released and the error re-raised: nothing
        accepted is silently dropped.
        ``inflight_ttl_s`` overrides the claim's lifetime for tasks with a longer hard limit (audits).
        ``fingerprints`` (name@version -> result fingerprint) are the models as the key was made from them:
        the worker checks its own catalog against them (:attr:`Job.fingerprints`).
        ``owner`` (the API key's id) owns the job record returned, whatever the outcome: a cache hit or a
        join across owners gives the caller a record of its own (:meth:`_join_as`), never another's job.
        ``looked_up`` is :meth:`lookup` of ``key`` when the caller has just made it (to decide whether to
        decode the image): the first attempt goes by it instead of looking again, and a hit whose record
        it saved already (:attr:`Lookup.recorded`, made for this same ``owner`` and ``key``) is answered
        with that record, without another trip.

        In round trips: the record, the claim on ``key`` and the job's hand-over claim (see
        :meth:`_enqueue`; nobody else knows the new id, so it is always this job's) are written in one;
        the owner of the result (``made-for:``) is written with the hand-over claim's release, once the
        job is queued. A cache hit in between finds no owner, so a caller with a key is told ``cached: false``
        (never another key's ``true``).
        """
        recorded = looked_up.recorded if looked_up is not None else None
        if looked_up is not None and recorded is not None and recorded.owner == owner and recorded.content_key == key:
            # Saved by the look-up already: nothing left to write.
            return Submission(recorded, "cached", looked_up.result, foreign=looked_up.made_for != (owner or ""))
        job = _new_job(kind, model, parameters, key, image_key, total, fingerprints, owner)
        claim_ttl_s = inflight_ttl_s if inflight_ttl_s is not None else self.inflight_ttl_s
        record, guard = job.model_dump_json().encode(), keys.CLAIM + job.id
        for _ in range(3):
            found, looked_up = looked_up or self.lookup(key), None
            if found.result is not None:
                foreign = found.made_for != (owner or "")
                return Submission(self.save(_answered_from_cache(job)), "cached", found.result, foreign=foreign)
            handover = leases.handover_holder().encode()
            _, claimed_key, guarded = self.store.round_trip(
                [
                    Set(keys.JOB + job.id, record, self.ttl_s),  # first: whoever reads the claim finds the job
                    SetIfAbsent(keys.INFLIGHT + key, job.id.encode(), claim_ttl_s),
                    SetIfAbsent(guard, handover, self.ttl_s),
                ]
            )
            if claimed_key:
                made_for = Set(keys.MADE_FOR + key, (owner or "").encode(), self.ttl_s)
                self._enqueue(job, enqueue, handover=handover if guarded else None, then=[made_for])
                return Submission(job, "queued")
            _, _, claimed = self.store.round_trip(
                [Delete(keys.JOB + job.id), DeleteIf(guard, handover), Get(keys.INFLIGHT + key)]
            )
            running = self.get(claimed.decode()) if claimed else None
            if running is not None and running.status not in TERMINAL_STATUSES:
                if leases.drop_if_abandoned(self.store, running.id):
                    # Its worker died holding it: queue it again rather than join a job nobody runs.
                    self._enqueue(running, enqueue)
                return Submission(self._join_as(owner, running, job), "joined")
            if claimed is not None:  # stale: taken over only if nobody else took it over meanwhile
                self.store.delete_if(keys.INFLIGHT + key, claimed)
        raise RuntimeError(f"could not claim content key {key} after 3 attempts")

    def create(
        self,
        *,
        job_id: str,
        kind: JobKind,
        model: str,
        parameters: Mapping[str, Any],
        enqueue: Callable[[Job], None],
        owner: str | None = None,
    ) -> Job:
        """A new job that is never answered from the cache nor joined: work with side effects (registering a model).

        Its content key is unique to the job (where its result is kept), and ``job_id`` is chosen by the
        caller, who may have named files after it. As in :meth:`submit`, a failing ``enqueue`` marks the
        job failed and re-raises.
        """
        key = sha256_hex(f"{kind}-job:{job_id}".encode())
        job = self.save(_queued(job_id, kind, model, parameters, key, owner=owner))
        self._enqueue(job, enqueue)
        return job

    def _enqueue(
        self,
        job: Job,
        enqueue: Callable[[Job], None],
        *,
        handover: bytes | None = None,
        then: Sequence[Command] = (),
    ) -> None:
        """Hand ``job`` to the queue; a job the queue refuses is failed (never left queued) and the error raised.

        While it is handed over, the job carries a claim by this (heartbeat-less) process: should the
        store go away before the job is either queued or failed, or this process die, the claim stays
        behind abandoned, and a worker's reaper queues the job once the store answers again
        (:mod:`classlens.core.leases`), instead of leaving it ``queued`` with no message.
        ``handover`` is that claim when the caller took it already; ``then`` are writes to send with
        its release, once the job is queued (one trip for both).
        """
        guard = keys.CLAIM + job.id
        if handover is None:
            mine = leases.handover_holder().encode()
            # Never over a worker's claim (a job queued again after its worker died may be taken already).
            guarded = self.store.set_if_absent(guard, mine, self.ttl_s)
        else:
            mine, guarded = handover, True
        release = [DeleteIf(guard, mine)] if guarded else []
        try:
            enqueue(job)
        except Exception:
            try:
                self.fail(job, "Could not queue the job", "the queue did not accept the job; try again")
            finally:
                self.store.round_trip(release)
            raise
        except BaseException:
            self.store.round_trip(release)
            raise
        self.store.round_trip([*then, *release])

    # -- the worker side -----------------------------------------------------------------------------

    def start(self, job: Job, *, writes: Writes | None = None) -> Job:
        return self.update(job, writes=writes, status="running", started_at=time.time())

    def progress(self, job: Job, done: int, total: int | None = None) -> Job:
        """Record ``done`` (of ``total``, when the work has learnt its size; else the job's total so far)."""
        return self.update(job, progress=Progress(done=done, total=job.progress.total if total is None else total))

    def succeed(self, job: Job, result: bytes, *, writes: Writes | None = None, **changes: Any) -> Job:
        """Store the result under the content key (the cache), then finish the job and drop the claim.

        In that order, in one round trip (or on ``writes``); ``changes``: other fields of the
        record set in the same copy (a batch's size).
        """
        with self._writing(writes) as block:
            block.set(keys.RESULT + job.content_key, result, self.ttl_s)
            finished = self.update(
                job,
                writes=block,
                status="succeeded",
                finished_at=time.time(),
                progress=Progress(done=job.progress.total, total=job.progress.total),
                error=None,
                **changes,
            )
            block.delete_if(keys.INFLIGHT + job.content_key, job.id.encode())  # release(), on the block
        return finished

    def fail(self, job: Job, title: str, detail: str) -> Job:
        failed = self.update(job, status="failed", finished_at=time.time(), error=JobError(title=title, detail=detail))
        self.release(failed)
        return failed

    def release(self, job: Job) -> None:
        """Drop ``inflight:<key>`` if this job holds it, so a later equal request is computed afresh.

        A compare-and-delete: a claim that lapsed and was taken by another job meanwhile stays that job's.
        """
        self.store.delete_if(keys.INFLIGHT + job.content_key, job.id.encode())
