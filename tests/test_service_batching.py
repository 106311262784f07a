"""Cross-request batching end to end: the real app, redis-server and Celery worker processes.

Jobs are queued while no worker runs, so that the worker that starts finds them all
waiting: the test then knows exactly which batches must form.
"""

from __future__ import annotations

import io
import time

import pytest

from classlens.core.settings import Settings
from service.app import create_app
from tests.service_fixtures import SAMPLES, TINY_MODEL, checked, finished_job, worker_running

IMAGES = sorted(SAMPLES.glob("*.png"))[:8]


def _settings(tmp_path_factory, redis_url: str, tiny_model_root, database: int, batch_max: int) -> Settings:
    return Settings(
        redis_url=f"{redis_url}/{database}",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("data"),
        worker_heartbeat_s=1,
        batch_max=batch_max,
        batch_wait_ms=20,
    )


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    return _settings(tmp_path_factory, redis_url, tiny_model_root, 5, batch_max=8)


def _submit(app, client, image: bytes, **fields: str) -> str:
    data = {"image": (io.BytesIO(image), "image.png"), "model": TINY_MODEL, **fields}
    response = checked(app, client.post("/v1/explanations", data=data, content_type="multipart/form-data"))
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "queued", response.get_json()
    return str(response.get_json()["id"])


def _results(app, client, job_ids: list[str]) -> list[dict]:
    jobs = [finished_job(app, client, f"/v1/explanations/{job_id}") for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * len(jobs), [job.get("error") for job in jobs]
    return jobs


def test_queued_jobs_share_one_pass_with_results_identical_to_unbatched(
    app, client, settings, store, tmp_path_factory, redis_url, tiny_model_root
):
    images = [path.read_bytes() for path in IMAGES]
    batched = [_submit(app, client, image, layers="0,2") for image in images]
    others = [_submit(app, client, image, top_k="2") for image in images[:2]]  # other parameters: another batch
    with worker_running(settings, store, tmp_path_factory.mktemp("worker") / "worker.log"):
        jobs = _results(app, client, batched)
        other_jobs = _results(app, client, others)
    assert [job["batch_size"] for job in jobs] == [8] * 8, "one pass for the eight"
    assert [job["batch_size"] for job in other_jobs] == [2, 2]

    # The same requests through a worker that does not batch.
    alone = _settings(tmp_path_factory, redis_url, tiny_model_root, 6, batch_max=1)
    from classlens.core.store import RedisStore

    alone_store = RedisStore(alone.redis_url or "")
    alone_app = create_app(alone, store=alone_store)
    alone_client = alone_app.test_client()
    single = [_submit(alone_app, alone_client, image, layers="0,2") for image in images]
    with worker_running(alone, alone_store, tmp_path_factory.mktemp("worker-alone") / "worker.log"):
        reference = _results(alone_app, alone_client, single)
    assert [job["batch_size"] for job in reference] == [1] * 8
    for got, want in zip(jobs, reference, strict=True):
        got_scores, want_scores = _pop_scores(got["result"]), _pop_scores(want["result"])
        assert got["result"] == want["result"]  # classes, ranks, stream statistics, maps: identical
        # Logits and probabilities as float32 computes them: a batch's products sum in another order.
        assert got_scores == pytest.approx(want_scores, rel=1e-6, abs=1e-7)


def _pop_scores(explanation: dict) -> list[float]:
    """Take the raw logits and probabilities out of ``explanation`` (in place) and return them in order."""
    scores = []
    for entry in explanation["prediction"] + explanation["targets"]:
        scores += [entry.pop("logit"), entry.pop("probability")]
    return scores


def test_a_job_held_by_a_dead_worker_is_taken_over(app, client, settings, store, tmp_path_factory):
    job_id = _submit(app, client, (SAMPLES / "test-00029.png").read_bytes(), layers="1")
    # What a worker that died mid-batch leaves behind: its claim on the job, and no heartbeat.
    assert store.set_if_absent(f"claim:{job_id}", b"gone-host:1:dead", 600.0)
    started = time.monotonic()
    with worker_running(settings, store, tmp_path_factory.mktemp("worker-lease") / "worker.log"):
        [job] = _results(app, client, [job_id])
    assert job["batch_size"] == 1
    assert store.get(f"claim:{job_id}") is None, "the claim is released"
    assert time.monotonic() - started < 60, "taken over at once, not after the claim's lease"
