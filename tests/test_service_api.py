"""The HTTP API end to end: the real Flask app, a real redis-server and a real Celery worker process.

Every response is validated against openapi.yaml. The worker explains with a tiny random
ViT (``tiny-vit``), so the figures mean nothing but every part of the flow is real.
"""

import io
import time
import zipfile

import pytest
from PIL import Image

from classlens.core.queue import EXPLAIN_QUEUE, create_celery, queue_depths
from classlens.core.settings import Settings
from service.app import create_app
from tests.service_fixtures import (
    TINY_DEPTH,
    TINY_MODEL,
    b64,
    checked,
    noise_png,
    png_header_only,
    problem,
    sample_png,
    worker_running,
)

MAX_UPLOAD = 2_000_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    return Settings(
        redis_url=f"{redis_url}/0",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("data"),
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        worker_heartbeat_s=1,
    )


@pytest.fixture(scope="module")
def running_worker(settings, store, tmp_path_factory):
    with worker_running(settings, store, tmp_path_factory.mktemp("worker") / "worker.log") as process:
        yield process


def post_form(client, image: bytes, query: str = "", **fields):
    data = {"image": (io.BytesIO(image), "image.png"), "model": TINY_MODEL, **fields}
    return client.post(f"/v1/explanations{query}", data=data, content_type="multipart/form-data")


def post_json(client, body, query: str = ""):
    return client.post(f"/v1/explanations{query}", json=body)


def finished(app, client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = checked(app, client.get(f"/v1/explanations/{job_id}?wait=5"))
        body = response.get_json()
        if body["status"] in {"succeeded", "failed"}:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


# -- the job flow ------------------------------------------------------------------------------------


def test_full_flow_cache_hit_and_map(app, client, running_worker):
    response = checked(app, post_form(client, sample_png(), targets="Trouser,0", layers="0,2"))
    assert response.status_code in {200, 202}
    assert response.headers["Location"] == f"/v1/explanations/{response.get_json()['id']}"
    job = finished(app, client, response.get_json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["model"]["name"] == TINY_MODEL
    assert len(result["model"]["weights_sha256"]) == 64
    assert result["grid"] == [7, 7]
    assert result["layers"] == TINY_DEPTH
    assert [t["index"] for t in result["targets"]] == [1, 0]  # label names resolved to indices, order kept
    target = result["targets"][0]
    assert set(target["projection_maps"]) == {"0", "2"}
    assert len(target["pooled_ranks"]) == TINY_DEPTH + 1
    assert job["parameters"]["targets"] == [1, 0]
    assert job["parameters"]["layers"] == [0, 2]

    png = client.get(f"/v1/explanations/{job['id']}/maps/1.png?layer=0")
    assert png.status_code == 200
    assert png.mimetype == "image/png"
    assert Image.open(io.BytesIO(png.data)).size[0] >= 224
    by_label = checked(app, client.get(f"/v1/explanations/{job['id']}/maps/trouser.png"))
    assert by_label.status_code == 200
    problem(app, client.get(f"/v1/explanations/{job['id']}/maps/5.png"), 404, "unknown_target")
    # A target in the URL is read as a submitted one: ASCII digits an index, a label in any case and spacing.
    for named in ("01", "%20TROUSER%20"):
        same = checked(app, client.get(f"/v1/explanations/{job['id']}/maps/{named}.png?layer=0"))
        assert same.status_code == 200
        assert same.data == png.data
    body = problem(app, client.get(f"/v1/explanations/{job['id']}/maps/%C2%B9.png"), 404, "unknown_target")
    assert body["detail"] == "'¹' was not explained; targets: 1 (Trouser), 0 (T-shirt/top)"
    problem(app, client.get(f"/v1/explanations/{job['id']}/maps/1.png?layer=1"), 404, "no_map")
    problem(app, client.get(f"/v1/explanations/{job['id']}/maps/1.png?kind=gradient"), 404, "no_map")

    # The same request in JSON, the targets as indices: the same content key, so a cache hit at once.
    again = checked(
        app, post_json(client, {"image": b64(sample_png()), "model": TINY_MODEL, "targets": [1, 0], "layers": [2, 0]})
    )
    assert again.status_code == 200
    body = again.get_json()
    assert body["cached"] is True
    assert body["status"] == "succeeded"
    assert body["id"] != job["id"]
    assert body["result"] == result

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'classlens_submissions_total{kind="explanation",outcome="cached"} 1.0' in metrics
    assert f'classlens_jobs_total{{kind="explanation",model="{TINY_MODEL}@1",status="succeeded"}}' in metrics
    assert "classlens_emergence_layer_total{layer=" in metrics or "classlens_emergence_layer_total{model=" in metrics
    assert "classlens_job_duration_seconds_bucket" in metrics
    assert "classlens_queue_depth" in metrics


def test_baseline_maps_are_asked_for_and_drawn(app, client, running_worker):
    response = checked(app, post_form(client, sample_png(), targets="1", baseline_maps="rollout,chefer,rollout"))
    job = finished(app, client, response.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert job["parameters"]["baseline_maps"] == ["chefer", "rollout"]
    maps = job["result"]["targets"][0]["baseline_maps"]
    assert set(maps) == {"chefer", "rollout"}
    assert len(maps["rollout"]) == 7
    png = checked(app, client.get(f"/v1/explanations/{job['id']}/maps/1.png?kind=chefer"))
    assert png.status_code == 200
    assert png.mimetype == "image/png"
    problem(app, client.get(f"/v1/explanations/{job['id']}/maps/1.png?kind=gradcam"), 404, "no_map")
    # The same request in JSON, the methods in another order: the same canonical parameters, a cache hit.
    body = {"image": b64(sample_png()), "model": TINY_MODEL, "targets": [1], "baseline_maps": ["rollout", "chefer"]}
    again = checked(app, post_json(client, body))
    assert again.get_json()["cached"] is True
    # Without the option, the parameters are those of a request from before it existed.
    plain = finished(app, client, checked(app, post_form(client, sample_png(), targets="1")).get_json()["id"])
    assert "baseline_maps" not in plain["parameters"]
    assert "baseline_maps" not in plain["result"]["targets"][0]


def test_long_poll_top_k_and_failure_recorded(app, client, running_worker):
    response = checked(app, post_form(client, sample_png("test-00000.png"), "?wait=60", top_k="2", gradient_map="true"))
    job = finished(app, client, response.get_json()["id"])
    assert job["status"] == "succeeded"
    assert len(job["result"]["targets"]) == 2
    assert job["result"]["targets"][0]["gradient_map"] is not None
    gradient = client.get(f"/v1/explanations/{job['id']}/maps/{job['result']['targets'][0]['index']}.png?kind=gradient")
    assert gradient.status_code == 200


def test_identical_requests_in_flight_join_one_job(app, settings, store, redis_url):
    # A queue nobody consumes (another Redis database as broker): the job stays queued.
    idle = create_celery(settings.model_copy(update={"redis_url": f"{redis_url}/1"}))
    idle_app = create_app(settings, store=store, celery=idle)
    client = idle_app.test_client()
    image = noise_png(28)
    first = checked(idle_app, post_form(client, image, layers="1"))
    second = checked(idle_app, post_json(client, {"image": b64(image), "model": TINY_MODEL, "layers": [1]}))
    assert first.status_code == second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    assert first.get_json()["status"] == "queued"
    assert queue_depths(idle)[EXPLAIN_QUEUE] == 1
    assert 'outcome="joined"} 1.0' in client.get("/metrics").get_data(as_text=True)


# -- bad input: always a 4xx problem, never queued -------------------------------------------------


def test_unsupported_image_type(app, client):
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PPM")
    problem(app, post_form(client, buffer.getvalue()), 415, "unsupported_format")


def test_unsupported_body_type(app, client):
    response = client.post("/v1/explanations", data=b"hello", content_type="text/plain")
    problem(app, response, 415, "unsupported_media_type")


def test_garbage_bytes(app, client):
    problem(app, post_form(client, b"\x00garbage" * 50), 422, "unreadable")
    problem(app, post_form(client, b""), 422, "empty")


def test_truncated_png(app, client):
    data = noise_png(256)
    problem(app, post_form(client, data[: len(data) // 2]), 422, "truncated")


def test_decompression_bomb(app, client):
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 100
    problem(app, post_form(client, bomb), 422, "too_many_pixels")


def test_too_many_pixels(app, client):
    problem(app, post_form(client, png_header_only(2000, 2000)), 422, "too_many_pixels")


def test_body_too_large(app, client):
    problem(app, post_form(client, b"\x00" * (MAX_UPLOAD + 1)), 413, "too_large")
    problem(app, post_json(client, {"image": "A" * (MAX_UPLOAD + 1), "model": TINY_MODEL}), 413, "too_large")


def test_unknown_model(app, client):
    problem(app, post_json(client, {"image": b64(sample_png()), "model": "nope"}), 422, "unknown_model")
    problem(app, post_json(client, {"image": b64(sample_png()), "model": f"{TINY_MODEL}@9"}), 422, "unknown_model")


def test_unknown_class(app, client):
    body = problem(app, post_form(client, sample_png(), targets="Trousers"), 422, "unknown_class")
    assert "Trouser" in body["detail"]
    problem(app, post_json(client, {"image": b64(sample_png()), "model": TINY_MODEL, "targets": [10]}), 422)


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": 0},
        {"top_k": "three"},
        {"layers": [TINY_DEPTH + 1]},
        {"layers": "some"},
        {"targets": []},
        {"targets": [1, "Trouser"]},
        {"map_kind": "heat"},
        {"sublayers": "yes"},
        {"unexpected": 1},
        {"model": 3},
        {"image": 3},
        {"image": "not base64!"},
    ],
)
def test_bad_parameters_and_wrong_json_types(app, client, fields):
    body = {"image": b64(sample_png()), "model": TINY_MODEL, **fields}
    problem(app, post_json(client, body), 422)


def test_bad_form_fields(app, client):
    problem(app, post_form(client, sample_png(), top_k="many"), 422)
    problem(app, post_form(client, sample_png(), layers="0,9"), 422, "bad_parameter")
    no_image = client.post("/v1/explanations", data={"model": TINY_MODEL}, content_type="multipart/form-data")
    assert 400 <= no_image.status_code < 500
    assert no_image.mimetype == "application/problem+json"


def test_malformed_json_and_bad_query(app, client):
    response = client.post("/v1/explanations", data=b"{not json", content_type="application/json")
    problem(app, response, 400)
    problem(
        app, post_json(client, {"image": b64(sample_png()), "model": TINY_MODEL}, "?wait=soon"), 400, "bad_parameter"
    )


def test_contract_verdicts_are_remembered_per_request_shape_and_only_per_shape(app, client):
    verdicts = app.extensions["classlens"].contract.memo
    before = verdicts.hits
    for _ in range(2):  # the same bad request twice: the same answer, the second from memory
        problem(app, post_form(client, sample_png(), top_k="many"), 422)
    assert verdicts.hits >= before + 1
    # Another image with the same fields shares the verdict; any other field or query does not.
    problem(app, post_form(client, sample_png("test-00001.png"), top_k="many"), 422)
    problem(app, post_form(client, sample_png(), "?wait=soon", top_k="3"), 400, "bad_parameter")
    problem(app, post_json(client, {"image": b64(sample_png()), "model": TINY_MODEL, "top_k": "many"}), 422)


def test_unknown_job_and_route(app, client):
    problem(app, client.get("/v1/explanations/0123456789abcdef"), 404, "unknown_job")
    problem(app, client.get("/v1/explanations/0123456789abcdef/maps/1.png"), 404, "unknown_job")
    assert client.get("/v1/nothing-here").mimetype == "application/problem+json"
    assert client.delete("/v1/models").status_code == 405


# -- models, health, metrics, the contract ---------------------------------------------------------


def test_models_endpoints(app, client):
    listed = checked(app, client.get("/v1/models")).get_json()["models"]
    tiny = next(model for model in listed if model["name"] == TINY_MODEL)
    assert tiny["grid"] == [7, 7]
    assert tiny["layers"] == TINY_DEPTH
    assert tiny["classes"] == 10
    detail = checked(app, client.get(f"/v1/models/{TINY_MODEL}@1")).get_json()
    assert detail["labels"][1] == "Trouser"
    assert detail["input"]["colour_mode"] == "L"
    problem(app, client.get("/v1/models/nope"), 404, "unknown_model")


def test_health(app, client, running_worker):
    assert checked(app, client.get("/livez")).get_json() == {"status": "ok"}
    ready = checked(app, client.get("/readyz"))
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["worker"].startswith("ok")


def test_not_ready_without_a_worker(tmp_path, tiny_model_root, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    bare = create_app(Settings(data_dir=tmp_path, model_dirs=[tiny_model_root]))
    response = bare.test_client().get("/readyz")
    body = problem(bare, response, 503, "not_ready")
    assert body["checks"]["worker"] == "no worker heartbeat"
    assert body["checks"]["store"] == "ok"


def test_metrics_and_contract(app, client):
    client.get("/livez")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'classlens_http_requests_total{method="GET",route="/livez",status="200"}' in text
    assert "classlens_http_request_duration_seconds_bucket" in text
    spec = client.get("/openapi.yaml")
    assert spec.status_code == 200
    assert spec.data.startswith(b"openapi: 3.1")
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert b"/v1/explanations" in docs.data


def test_zip_is_not_an_image(app, client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", sample_png())
    problem(app, post_form(client, buffer.getvalue()), 422, "unreadable")
