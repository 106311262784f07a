"""Faults, with real parts: kill -9 of worker processes, and a redis-server stopped and started again.

Each test submits jobs the way the API does (:meth:`JobStore.submit` with the explain task sent by
name and the job offered for batching), then breaks something and asserts that every accepted
job reaches a terminal status within 60 s of the fault or of the recovery, exactly once (the
per-status job counters the workers keep count one finish per job), with the results an
undisturbed run gives. The HTTP layer is left out on purpose: what is under test is the queue,
the store, the claims and the worker processes.

Heartbeats beat every 0.5 s here, so a dead worker's claims are abandoned 1.5 s after its death.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from classlens.core.batching import offer
from classlens.core.contract import TERMINAL_STATUSES, ExplainRequest, Job
from classlens.core.jobs import JobStore, content_key
from classlens.core.leases import CLAIM_PREFIX
from classlens.core.processes import Supervised
from classlens.core.queue import EXPLAIN_TASK, create_celery, enqueue
from classlens.core.settings import Settings
from classlens.core.store import RedisStore, SqliteStore, Store, StoreError, open_store
from model_store.catalog import Catalog
from tests.service_fixtures import (
    SAMPLES,
    TINY_MODEL,
    free_port,
    start_worker,
    stop_worker,
    wait_for_heartbeat,
    worker_env,
)

IMAGES = sorted(SAMPLES.glob("*.png"))[:8]
RECOVERY_S = 60.0
HEARTBEAT_S = 0.5


def _settings(tmp_path: Path, model_root: Path, redis_url: str | None, batch_max: int) -> Settings:
    return Settings(
        redis_url=redis_url,
        model_dirs=[model_root],
        data_dir=tmp_path / "data",
        worker_heartbeat_s=HEARTBEAT_S,
        batch_max=batch_max,
        embedded_poll_s=0.02,
    )


class Submitter:
    """The API's submission path for explanations, without HTTP."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.jobs = JobStore(store, ttl_s=3600, inflight_ttl_s=settings.task_time_limit_s)
        self.celery = create_celery(settings)
        self.entry = Catalog.default(settings.model_roots).resolve(TINY_MODEL)
        self.parameters = ExplainRequest(top_k=2, layers=[1, 2]).model_dump(mode="json")

    def submit(self, image: bytes, before_send: Callable[[Job], None] | None = None) -> Job:
        image_key = self.jobs.put_image(image)
        key = content_key(self.entry.result_fingerprint, image_key, self.parameters)

        def send(job: Job) -> None:
            if before_send is not None:
                before_send(job)
            enqueue(self.celery, EXPLAIN_TASK, job.id)
            if self.settings.batch_max > 1:
                offer(self.jobs.store, job, 3600)

        return self.jobs.submit(
            kind="explanation",
            model=self.entry.reference,
            parameters=self.parameters,
            key=key,
            image_key=image_key,
            enqueue=send,
            fingerprints={self.entry.reference: self.entry.result_fingerprint},
        ).job

    def finished(self, job_ids: list[str], deadline: float) -> dict[str, Job]:
        """The jobs once all are terminal; fails at ``deadline`` (time.monotonic) with the stragglers."""
        while True:
            jobs = {job_id: self.jobs.get(job_id) for job_id in job_ids}
            if all(job is not None and job.status in TERMINAL_STATUSES for job in jobs.values()):
                return {job_id: job for job_id, job in jobs.items() if job is not None}
            if time.monotonic() > deadline:
                pytest.fail(f"not finished in time: {[(i, j and j.status) for i, j in jobs.items()]}")
            time.sleep(0.1)

    def results(self, jobs: dict[str, Job]) -> list[dict]:
        assert [job.status for job in jobs.values()] == ["succeeded"] * len(jobs), [j.error for j in jobs.values()]
        out = []
        for job in jobs.values():
            data = self.jobs.result(job.content_key)
            assert data is not None
            out.append(json.loads(data))
        return out

    def finishes(self, status: str = "succeeded") -> int:
        """How many times a worker finished an explanation with ``status`` (once per job, if all is well)."""
        value = self.jobs.store.get(f"stats:jobs:explanation:{self.entry.reference}:{status}")
        return int(value or 0)


def _kill_when_claimed(
    store: Store, process: subprocess.Popen[bytes], log: Path, count: int, timeout_s: float = 90
) -> None:
    """kill -9 ``process`` once it claims ``count`` jobs (then it loads the model: about a second to spare)."""
    deadline = time.monotonic() + timeout_s
    while len(store.keys(CLAIM_PREFIX)) < count:
        if process.poll() is not None:
            pytest.fail(f"the worker exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no job was claimed in {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert len(store.keys(CLAIM_PREFIX)) == count, "killed while holding its batch"


def _comparable(results: list[dict]) -> list[dict]:
    """Results without raw logits and probabilities (a batch sums its products in another order)."""
    for result in results:
        for entry in result["prediction"] + result["targets"]:
            entry["logit"] = round(entry["logit"], 4)
            entry["probability"] = round(entry["probability"], 5)
    return results


def _scenario_kill_mid_batch(tmp_path: Path, model_root: Path, url: str, batch_max: int) -> list[dict]:
    """Eight jobs, a worker killed while it holds them (or its one), a fresh worker: all done within 60 s."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = _settings(tmp_path, model_root, url, batch_max)
    store = RedisStore(url)
    store.delete(f"stats:jobs:explanation:{TINY_MODEL}@1:succeeded")  # a database of its own, counted afresh
    submitter = Submitter(settings, store)
    images = [path.read_bytes() for path in IMAGES]
    job_ids = [submitter.submit(image).id for image in images]
    env = worker_env(settings)
    doomed_log, healthy_log = tmp_path / f"doomed-{batch_max}.log", tmp_path / f"healthy-{batch_max}.log"
    doomed = start_worker(env, doomed_log, "gpu")
    _kill_when_claimed(store, doomed, doomed_log, 8 if batch_max > 1 else 1)
    killed_at = time.monotonic()
    healthy = start_worker(env, healthy_log, "gpu")
    try:
        jobs = submitter.finished(job_ids, killed_at + RECOVERY_S)
        print(f"batch_max={batch_max}: every job terminal {time.monotonic() - killed_at:.1f} s after kill -9")
        # A second submission of an image equal to a finished one is a cache hit, not a new run.
        assert submitter.submit(images[0]).status == "succeeded"
    finally:
        stop_worker(healthy)
    assert submitter.finishes() == len(job_ids), "each job finished exactly once"
    assert store.keys(CLAIM_PREFIX) == [], "no claim left behind"
    return _comparable(submitter.results(jobs))


def test_kill_9_of_a_worker_mid_batch_costs_seconds(tmp_path, tiny_model_root, redis_url):
    """Batching on (8 jobs claimed by the doomed worker) and off (its one job): all finish within 60 s, once."""
    started = time.monotonic()
    batched = _scenario_kill_mid_batch(tmp_path / "on", tiny_model_root, f"{redis_url}/11", batch_max=8)
    alone = _scenario_kill_mid_batch(tmp_path / "off", tiny_model_root, f"{redis_url}/12", batch_max=1)
    assert batched == alone, "the same results as without batching"
    assert time.monotonic() - started < 4 * RECOVERY_S


def test_a_submission_does_not_join_a_job_whose_worker_died(tmp_path, tiny_model_root, redis_url):
    """An equal request re-queues a running job whose claim names a dead worker, and gets it done."""
    url = f"{redis_url}/13"
    settings = _settings(tmp_path, tiny_model_root, url, batch_max=1)
    store = RedisStore(url)
    submitter = Submitter(settings, store)
    image = IMAGES[0].read_bytes()
    job = submitter.submit(image)
    # What a dead worker leaves: the job running, claimed by it, its message gone with it (purged here).
    submitter.jobs.start(job)
    store.set(f"{CLAIM_PREFIX}{job.id}", b"gone-host:1:dead", 3600)
    submitter.celery.control.purge()
    assert submitter.submit(image).id == job.id, "joined"
    assert store.get(f"{CLAIM_PREFIX}{job.id}") is None, "its dead claim is dropped, the job queued again"
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env(settings), log, "gpu")
    try:
        [done] = submitter.finished([job.id], time.monotonic() + RECOVERY_S + 30).values()
    finally:
        stop_worker(worker)
    assert done.status == "succeeded"
    assert submitter.finishes() == 1


# -- the embedded default ---------------------------------------------------------------------------------


@pytest.fixture
def embedded_settings(tmp_path, tiny_model_root, monkeypatch) -> Settings:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CLASSLENS_REDIS_URL", raising=False)
    return _settings(tmp_path, tiny_model_root, None, batch_max=8)


def test_the_embedded_worker_is_restarted_and_its_jobs_complete(tmp_path, embedded_settings):
    settings = embedded_settings
    store = open_store(settings)
    assert isinstance(store, SqliteStore)
    submitter = Submitter(settings, store)
    job_ids = [submitter.submit(path.read_bytes()).id for path in IMAGES[:4]]
    logs: list[Path] = []
    said: list[str] = []

    def start(queues: tuple[str, ...] = ("gpu",)) -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"embedded-{len(logs)}.log")
        return start_worker(worker_env(settings), logs[-1], ",".join(queues))

    supervised = Supervised("worker [gpu]", start, check_s=0.2, log=said.append)
    try:
        first = supervised.process
        _kill_when_claimed(store, first, logs[0], len(job_ids))
        killed_at = time.monotonic()
        jobs = submitter.finished(job_ids, killed_at + RECOVERY_S)
        print(f"embedded: every job terminal {time.monotonic() - killed_at:.1f} s after kill -9")
        assert supervised.restarts >= 1
        assert supervised.process.pid != first.pid
        assert any("exited with -9" in line for line in said), said
    finally:
        supervised.stop(grace_s=20)
    assert submitter.finishes() == len(job_ids)
    assert len(submitter.results(jobs)) == len(job_ids)


def test_readyz_says_503_while_no_embedded_worker_lives(tmp_path, embedded_settings):
    from classlens.core.heartbeat import last_beat

    settings = embedded_settings
    store = open_store(settings)
    log = tmp_path / "worker.log"
    process = start_worker(worker_env(settings), log)
    try:
        wait_for_heartbeat(store, process, log)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        stop_worker(process)
    deadline = time.monotonic() + 3 * HEARTBEAT_S + 2
    while last_beat(store) is not None:  # what /readyz reads: gone three periods after the last beat
        assert time.monotonic() < deadline, "the heartbeat outlived its worker"
        time.sleep(0.1)


# -- a Redis outage -----------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own, persisting to an append-only file, that can be stopped and restarted."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or pytest.fail("redis-server is not installed")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)
            self.process = None


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_redis_restart_under_load_loses_no_accepted_job(tmp_path, tiny_model_root, own_redis):
    settings = _settings(tmp_path, tiny_model_root, own_redis.url, batch_max=8)
    store = RedisStore(own_redis.url, timeout_s=1.0)
    submitter = Submitter(settings, store)
    env = worker_env(settings)
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(env, log, "gpu") for log in logs]
    try:
        for process, log in zip(workers, logs, strict=True):
            wait_for_heartbeat(store, process, log)
        images = [path.read_bytes() for path in IMAGES]
        # A small load: jobs keep arriving until the outage, some of them while workers are mid-batch.
        accepted = [submitter.submit(image).id for image in images[:4]]
        time.sleep(0.3)
        accepted += [submitter.submit(image).id for image in images[4:6]]
        states = [submitter.jobs.get(job_id) for job_id in accepted]
        unfinished = [job for job in states if job is not None and job.status not in TERMINAL_STATUSES]
        # The outage begins while a job is being handed to the queue: the queue refuses it, and the
        # store cannot record that either. The client gets a 503; the job must not stay queued forever.
        caught: list[Job] = []

        def outage(job: Job) -> None:
            caught.append(job)
            own_redis.stop()

        with pytest.raises(StoreError):  # what the API answers with a 503
            submitter.submit(images[6], before_send=outage)
        print(f"redis stopped with {len(unfinished)} of {len(accepted)} accepted jobs unfinished")
        with pytest.raises(StoreError):  # refused outright while Redis is down: not accepted
            submitter.submit(images[7])
        time.sleep(2.0)
        own_redis.start()
        recovered_at = time.monotonic()
        accepted += [submitter.submit(images[7]).id]
        jobs = submitter.finished([*accepted, caught[0].id], recovered_at + RECOVERY_S)
        print(f"redis restart: every job terminal {time.monotonic() - recovered_at:.1f} s after recovery")
        assert jobs.pop(caught[0].id).status == "succeeded", "the job caught mid-hand-over was queued again"
        for process, log in zip(workers, logs, strict=True):
            assert process.poll() is None, log.read_text()[-3000:]
    finally:
        for process in workers:
            stop_worker(process)
    # A worker's count of a finish can be lost with the store going down under it (its job is already
    # recorded succeeded above), never counted twice: so the counter bounds from above that no job ran twice.
    assert submitter.finishes() <= len(accepted) + 1, "no job finished twice"
    assert submitter.finishes("failed") == 0
    assert len(submitter.results(jobs)) == len(accepted)


# -- the embedded broker and abuse of the HTTP server ---------------------------------------------------------


def test_the_embedded_broker_hands_out_whole_messages_exactly_once(tmp_path):
    """A producer and two consumers on one folder: every message arrives once, whole (no half-written file)."""
    import threading

    from kombu import Connection

    from classlens.core.queue import _broker

    url, options = _broker(Settings(data_dir=tmp_path))
    count, seen, errors = 600, [], []
    lock = threading.Lock()

    def consume() -> None:
        with Connection(url, transport_options=options) as connection:
            queue = connection.SimpleQueue("faults")
            while True:
                try:
                    message = queue.get(timeout=3)
                except queue.Empty:
                    return
                except Exception as error:  # a half-written message would be a JSONDecodeError here
                    errors.append(error)
                    return
                message.ack()
                with lock:
                    seen.append(message.payload["n"])

    consumers = [threading.Thread(target=consume) for _ in range(2)]
    for thread in consumers:
        thread.start()
    with Connection(url, transport_options=options) as connection:
        queue = connection.SimpleQueue("faults")
        for n in range(count):
            queue.put({"n": n, "padding": "x" * 20_000})
    for thread in consumers:
        thread.join(30)
    assert errors == []
    assert sorted(seen) == list(range(count))


def test_long_polls_never_take_every_thread(tmp_path):
    """Past ``max_waiters`` long polls, a poll answers at once with the job as it is."""
    import threading

    store = SqliteStore(tmp_path / "store.sqlite3")
    jobs = JobStore(store, ttl_s=60, inflight_ttl_s=60, max_waiters=2)
    job = jobs.save(
        Job(
            id="j",
            kind="explanation",
            status="queued",
            created_at=0,
            updated_at=0,
            model="m@1",
            parameters={},
            content_key="k",
        )
    )
    waiting = [threading.Thread(target=jobs.wait, args=(job, 3.0)) for _ in range(2)]
    for thread in waiting:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert jobs.wait(job, 3.0).status == "queued"
    assert time.monotonic() - started < 0.5, "the third poll did not wait"
    for thread in waiting:
        thread.join(5)


def test_slow_clients_do_not_stop_classlens_serve(tmp_path, tiny_model_root, redis_url):
    """600 connections that send half a request line each; /livez still answers a new client at once."""
    import socket
    import sys
    import urllib.request

    port = free_port()
    settings = _settings(tmp_path, tiny_model_root, f"{redis_url}/14", batch_max=1)
    env = {**os.environ, **worker_env(settings), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "classlens.cli", "serve", "--port", str(port), "--threads", "8"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    sockets: list[socket.socket] = []
    try:
        livez = f"http://127.0.0.1:{port}/livez"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(livez, timeout=1).read()
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        for _ in range(600):
            slow = socket.create_connection(("127.0.0.1", port), timeout=5)
            slow.sendall(b"GET /v1/explanations/x HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            sockets.append(slow)
        started = time.monotonic()
        with urllib.request.urlopen(livez, timeout=5) as response:
            assert response.status == 200
        assert time.monotonic() - started < 2.0
    finally:
        for slow in sockets:
            slow.close()
        stop_worker(server)
