"""KServe's V1 explain verb (``POST /v1/models/{name}:explain``) over a real redis-server, and with a real worker.

Every response is validated against openapi.yaml. The instances become the same jobs as
``POST /v1/explanations`` makes: the same job for the same image and parameters, the same result.
"""

from __future__ import annotations

import base64

import pytest

from classlens.core.queue import EXPLAIN_QUEUE, create_celery, queue_depths
from classlens.core.settings import Settings
from tests.service_fixtures import TINY_MODEL, b64, checked, noise_png, problem, sample_png, worker_running

URL = f"/v1/models/{TINY_MODEL}:explain"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    return Settings(
        redis_url=f"{redis_url}/7",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("data"),
        worker_heartbeat_s=1,
        max_wait_s=60,
    )


def queued(settings: Settings) -> int:
    return queue_depths(create_celery(settings), (EXPLAIN_QUEUE,)).get(EXPLAIN_QUEUE, 0)


def test_string_and_b64_instances_are_queued_as_explanation_jobs(app, client, settings):
    first, second = sample_png("test-00002.png"), sample_png("test-00001.png")
    before = queued(settings)
    response = checked(
        app, client.post(f"{URL}?wait=0", json={"instances": [b64(first), {"b64": b64(second)}], "parameters": {}})
    )
    assert response.status_code == 202
    body = response.get_json()
    assert body["predictions"] == [None, None]
    assert [job["status"] for job in body["explanations"]] == ["queued", "queued"]
    assert len({job["id"] for job in body["explanations"]}) == 2
    assert queued(settings) == before + 2
    # The very job POST /v1/explanations finds for the same image and (default) parameters.
    again = checked(app, client.post("/v1/explanations", json={"image": b64(second), "model": TINY_MODEL}))
    assert again.get_json()["id"] == body["explanations"][1]["id"]
    polled = checked(app, client.get(body["explanations"][0]["links"]["self"]))
    assert polled.get_json()["parameters"] == body["explanations"][0]["parameters"]


def test_parameters_are_those_of_post_explanations(app, client):
    sent = {"instances": [b64(noise_png(32))], "parameters": {"top_k": 2, "layers": [1]}}
    response = checked(app, client.post(f"{URL}?wait=0", json=sent))
    (job,) = response.get_json()["explanations"]
    assert job["parameters"]["top_k"] == 2
    assert job["parameters"]["layers"] == [1]
    body = problem(
        app, client.post(URL, json={"instances": [b64(sample_png())], "parameters": {"top_k": 0}}), 422, "invalid_body"
    )
    assert body["detail"].startswith("instances[0]: top_k")
    body = problem(
        app, client.post(URL, json={"instances": [b64(sample_png())], "parameters": {"layers": [9]}}), 422, None
    )
    assert "instances[0]" in body["detail"]
    problem(app, client.post(URL, json={"instances": [b64(sample_png())], "parameters": {"model": "x"}}), 422)


def test_a_bad_instance_refuses_the_request_before_anything_is_queued(app, client, settings):
    good = b64(noise_png(48))
    before = queued(settings)
    body = problem(app, client.post(URL, json={"instances": [good, "not base64!"]}), 422, "invalid_body")
    assert body["detail"].startswith("instances/1: ")  # the contract's own check of the body
    body = problem(app, client.post(URL, json={"instances": [good, {"b64": "QUJDRA"}]}), 422, "invalid_base64")
    assert body["detail"].startswith("instances[1]: ")
    garbage = base64.b64encode(b"this is no image at all").decode()
    body = problem(app, client.post(URL, json={"instances": [good, good, garbage]}), 422)
    assert body["detail"].startswith("instances[2]: ")
    assert queued(settings) == before


def test_too_many_or_no_instances_and_unknown_models_are_refused(app, client):
    image = b64(sample_png())
    problem(app, client.post(URL, json={"instances": [image] * 17}), 422, "invalid_body")
    problem(app, client.post(URL, json={"instances": []}), 422, "invalid_body")
    problem(app, client.post(URL, json={"inputs": [image]}), 422, "invalid_body")
    problem(app, client.post(URL, json={"instances": [{"bytes": image}]}), 422, "invalid_body")
    body = problem(app, client.post("/v1/models/no-such-model:explain", json={"instances": [image]}), 422)
    assert body["problem"] == "unknown_model"
    assert body["detail"].startswith("instances[0]: ")
    problem(app, client.post(URL, data=b"{", content_type="application/json"), 400, "malformed_body")


def test_with_a_worker_the_answer_waits_for_every_explanation(app, client, settings, store, tmp_path):
    images = [sample_png("test-00019.png"), sample_png("test-00000.png")]
    with worker_running(settings, store, tmp_path / "worker.log"):
        response = checked(app, client.post(URL, json={"instances": [b64(image) for image in images]}))
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert [job["status"] for job in body["explanations"]] == ["succeeded", "succeeded"]
        for prediction, job in zip(body["predictions"], body["explanations"], strict=True):
            assert prediction == job["result"]["prediction"]
            assert len(prediction) == 5
            assert set(job["links"]["maps"]) == {str(t["index"]) for t in job["result"]["targets"]}
        # POST /v1/explanations answers the same image from the same cached result.
        direct = checked(app, client.post("/v1/explanations", json={"image": b64(images[0]), "model": TINY_MODEL}))
        assert direct.status_code == 200
        assert direct.get_json()["result"] == body["explanations"][0]["result"]
        # Answered from the cache at once, even with no wait at all.
        again = checked(app, client.post(f"{URL}?wait=0", json={"instances": [{"b64": b64(images[1])}]}))
        assert again.status_code == 200
        assert again.get_json()["explanations"][0]["cached"] is True
