"""What a worker asks of the store per job: its bookkeeping in one round trip, per job and per batch.

The jobs run in this process, through the worker's own code (``explain_job``, ``run_single``) on a
real tiny ViT and a real redis-server of the test's own; the round trips are counted on the client
and the commands by the server (tests/round_trips.py). The counters the API exports are read back
through the same functions as ``/metrics`` reads them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from classlens.core import batching, keys, monitoring, stats
from classlens.core.contract import ExplainRequest, Explanation, Job
from classlens.core.jobs import JobStore, content_key
from classlens.core.settings import Settings
from classlens.core.store import RedisStore, SqliteStore, Store
from model_store.catalog import Catalog
from tests.round_trips import measured, private_redis
from tests.service_fixtures import SAMPLES, TINY_MODEL
from worker.jobs.explain import explain_job
from worker.jobs.runtime import Runtime
from worker.jobs.single import run_single
from worker.runtime import ModelCache

pytestmark = pytest.mark.integration

IMAGES = sorted(SAMPLES.glob("test-*.png"))
# What one explanation job (batch_max 1) may ask of the store, its model loaded: the first look at the
# record, the claim, the look again once claimed (record and result), the start, the image, the
# bookkeeping (result, record, counters, window: one pipeline) and the claim dropped. Sent one by one,
# the bookkeeping alone took more than 30.
ROUND_TRIPS_PER_JOB = 8
# The commands the server runs for it (a script's own calls included): fewer round trips, not fewer writes.
COMMANDS_PER_JOB = 50


@pytest.fixture
def redis_store(tmp_path) -> Iterator[RedisStore]:
    with private_redis(tmp_path / "redis") as server:
        yield RedisStore(server.url)


def make_runtime(store: Store, settings: Settings) -> Runtime:
    """The runtime ``worker.jobs.runtime`` builds, without its liveness thread (no traffic of its own)."""
    jobs = JobStore(store, ttl_s=settings.result_ttl_s, inflight_ttl_s=settings.task_time_limit_s)
    models = ModelCache(Catalog.default(settings.model_roots), settings.device, settings.onnx, settings.precision)
    return Runtime(settings, jobs, models, os.getpid())


def settings_for(tmp_path: Path, model_root: Path, **fields: object) -> Settings:
    return Settings(model_dirs=[model_root], data_dir=tmp_path / "data", **fields)  # type: ignore[arg-type]


def submit(rt: Runtime, image: Path, *, offer: bool = False) -> Job:
    """An explanation job as the API submits it (its message is not sent: the test runs it)."""
    entry = rt.models.catalog.resolve(TINY_MODEL)
    parameters = ExplainRequest(top_k=2).model_dump(mode="json")
    image_key = rt.jobs.put_image(image.read_bytes())
    job = rt.jobs.submit(
        kind="explanation",
        model=entry.reference,
        parameters=parameters,
        key=content_key(entry.result_fingerprint, image_key, parameters),
        image_key=image_key,
        enqueue=lambda job: None,
        fingerprints={entry.reference: entry.result_fingerprint},
    ).job
    if offer:
        batching.offer(rt.jobs.store, job, rt.settings.result_ttl_s)
    return job


def explain(rt: Runtime, job_id: str) -> Job:
    done = explain_job(rt, job_id)
    assert done is not None
    return done


def explained(rt: Runtime, job: Job) -> Explanation:
    data = rt.jobs.result(job.content_key)
    assert data is not None
    return Explanation.model_validate_json(data)


def test_explaining_one_job_makes_at_most_eight_round_trips(tmp_path, tiny_model_root, redis_store):
    rt = make_runtime(redis_store, settings_for(tmp_path, tiny_model_root, batch_max=1))
    first = submit(rt, IMAGES[0])
    assert explain(rt, first.id).status == "succeeded"  # the model is loaded now
    job = submit(rt, IMAGES[1])
    with measured(redis_store) as traffic:
        done = explain_job(rt, job.id)
    assert done is not None
    assert done.status == "succeeded"
    assert traffic.round_trips <= ROUND_TRIPS_PER_JOB, traffic
    assert traffic.total_commands <= COMMANDS_PER_JOB, traffic.commands
    # Its bookkeeping was made all the same: the counters of two jobs, the window of two explanations.
    model = done.model
    figures = stats.read_model_stats(redis_store, model, 2, ["explanation"])
    assert figures.jobs[("explanation", "succeeded")] == 2
    assert figures.duration_buckets["explanation"][-1] == (math.inf, 2)
    assert sum(figures.emergence.values()) == 2 * 2  # top_k=2 targets per explanation
    window = monitoring.read_window(redis_store, model, rt.settings.drift_window)
    assert sorted(window, key=lambda s: s.confidence) == sorted(
        [monitoring.signals(explained(rt, first)), monitoring.signals(explained(rt, job))], key=lambda s: s.confidence
    )


def test_a_batch_is_started_and_finished_in_one_round_trip_each(tmp_path, tiny_model_root, redis_store):
    rt = make_runtime(redis_store, settings_for(tmp_path, tiny_model_root, batch_max=4, batch_wait_ms=0))
    assert explain(rt, submit(rt, IMAGES[0]).id).status == "succeeded"  # the model is loaded now
    jobs = [submit(rt, image, offer=True) for image in IMAGES[1:5]]
    with measured(redis_store) as traffic:
        done = explain_job(rt, jobs[0].id)
    assert done is not None
    assert done.batch_size == 4
    finished = [rt.jobs.get(job.id) for job in jobs]
    assert [job.status if job else None for job in finished] == ["succeeded"] * 4
    # Per job, what only it needs: taken off the offer list, looked at, claimed, its image, its claim
    # dropped (the leader: its first look and claim); for the batch: one start, one bookkeeping.
    assert traffic.round_trips <= 6 * 4 + 4, traffic
    assert traffic.commands["publish"] == 2 * 4  # each job's start and success woke its long polls
    assert traffic.commands["incrby"] >= 4 * 10  # and every job's counters were made
    # The companions' own messages find their jobs finished: one read each.
    for job in jobs[1:]:
        with measured(redis_store) as again:
            assert explain(rt, job.id).status == "succeeded"
        assert again.round_trips == 1


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_records_written_on_a_callers_block_are_those_written_alone(backend, tmp_path, tiny_model_root, redis_store):
    store: Store = redis_store if backend == "redis" else SqliteStore(tmp_path / "store.sqlite3")
    rt = make_runtime(store, settings_for(tmp_path, tiny_model_root))
    alone, together = submit(rt, IMAGES[0]), submit(rt, IMAGES[1])
    jobs = rt.jobs
    by_store = jobs.succeed(jobs.start(alone), b'{"result": 1}')
    with store.writes() as writes:
        started = jobs.start(together, writes=writes)
        assert jobs.get(together.id) == together  # queued on the caller's block, not yet sent
    with store.writes() as writes:
        by_writes = jobs.succeed(started, b'{"result": 1}', writes=writes)

    def comparable(job: Job | None) -> dict[str, object]:
        assert job is not None
        times = {"created_at", "updated_at", "started_at", "finished_at"}
        return job.model_dump(exclude={"id", "content_key", "image_key", *times})

    assert comparable(by_writes) == comparable(by_store)
    assert comparable(jobs.get(together.id)) == comparable(jobs.get(alone.id))
    assert jobs.get(together.id) == by_writes
    assert jobs.result(together.content_key) == jobs.result(alone.content_key) == b'{"result": 1}'
    for job in (alone, together):  # the in-flight claims are dropped, so an equal request is computed afresh
        assert store.get(keys.INFLIGHT + job.content_key) is None


def test_a_single_job_finishes_in_one_round_trip(tmp_path, tiny_model_root, redis_store):
    rt = make_runtime(redis_store, settings_for(tmp_path, tiny_model_root))
    job = rt.jobs.create(job_id="a" * 32, kind="analysis", model="tiny-vit@1", parameters={}, enqueue=lambda job: None)

    def compute(job: Job) -> bytes:
        time.sleep(0.01)
        return b'{"figures": []}'

    with measured(redis_store) as traffic:
        done = run_single(rt, job.id, "analysis", 60, compute)
    assert done is not None
    assert done.status == "succeeded"
    # First look, claim, look again (record, result), start, the record read again after computing,
    # the bookkeeping (result, record, counters), the claim dropped.
    assert traffic.round_trips <= 8, traffic
    figures = stats.read_model_stats(redis_store, "tiny-vit@1", 2, ["analysis"])
    assert figures.jobs[("analysis", "succeeded")] == 1
    assert figures.duration_buckets["analysis"][0] == (0.05, 1)
    assert rt.jobs.result(job.content_key) == b'{"figures": []}'


def test_a_batch_and_its_bookkeeping_on_sqlite(tmp_path, tiny_model_root):
    store = SqliteStore(tmp_path / "store.sqlite3")
    rt = make_runtime(store, settings_for(tmp_path, tiny_model_root, batch_max=4, batch_wait_ms=0))
    jobs = [submit(rt, image, offer=True) for image in IMAGES[:3]]
    assert explain(rt, jobs[0].id).batch_size == 3
    finished = [rt.jobs.get(job.id) for job in jobs]
    assert [job.status if job else None for job in finished] == ["succeeded"] * 3
    model = jobs[0].model
    figures = stats.read_model_stats(store, model, 2, ["explanation"])
    assert figures.jobs[("explanation", "succeeded")] == 3
    assert sum(figures.emergence.values()) == 3 * 2
    signals = monitoring.read_stats(store, model, 2, 10, 10)
    assert sum(signals.classes.values()) == 3
    assert len(monitoring.read_window(store, model, rt.settings.drift_window)) == 3
    assert store.get(monitoring._sequence_key(model)) == b"3"  # the ring was put in three times
