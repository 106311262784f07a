"""``/v1/analyses`` end to end: the real Flask app, a real redis-server and a real Celery worker on ``analyses``.

Every response is validated against openapi.yaml. Two random tiny ViTs stand for two versions
of one production model (``tiny-vit@1`` and ``tiny-vit@2``): their figures mean nothing, but
every part of the flow is real, from the upload to the figure bytes the worker drew.
A last test runs the task in this process with a stand-in analysis, to check what the task
itself does (progress, figures, failures) whatever the analyses compute.
"""

import csv
import io

import pytest

from classlens.core.contract import Job
from classlens.core.queue import ANALYSIS_QUEUE, create_celery, queue_depths
from classlens.core.settings import Settings
from service.app import create_app
from tests.service_fixtures import (
    FASHION_LABELS,
    PNG_SIGNATURE,
    SAMPLES,
    TINY_MODEL,
    add_tiny_vit,
    b64,
    checked,
    finished_job,
    make_zip,
    noise_png,
    problem,
    sample_png,
    watch_progress,
    worker_running,
)

DB = 3  # a Redis database of this module's own (the explain tests use 0 and 1, the audits 2)
IDLE_DB = 4  # a broker nobody consumes: jobs sent there stay queued
MAX_IMAGES = 12
V1, V2 = f"{TINY_MODEL}@1", f"{TINY_MODEL}@2"
SAMPLE_LABELS = {
    row["file"]: int(row["label_index"])
    for row in csv.DictReader(io.StringIO((SAMPLES / "labels.csv").read_text()))
    if (SAMPLES / row["file"]).exists()
}
NAMES = sorted(SAMPLE_LABELS)[:8]


@pytest.fixture(scope="module")
def second_version_root(tmp_path_factory):
    return add_tiny_vit(tmp_path_factory.mktemp("tiny-model-v2"), version="2", seed=1)


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root, second_version_root):
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[tiny_model_root, second_version_root],
        data_dir=tmp_path_factory.mktemp("analysis-data"),
        worker_heartbeat_s=1,
        analysis_max_images=MAX_IMAGES,
    )


@pytest.fixture(scope="module")
def analysis_worker(settings, store, tmp_path_factory):
    log = tmp_path_factory.mktemp("analysis-worker") / "worker.log"
    with worker_running(settings, store, log, ANALYSIS_QUEUE) as process:
        yield process


@pytest.fixture(scope="module")
def idle_app(settings, store, redis_url):
    idle = create_celery(settings.model_copy(update={"redis_url": f"{redis_url}/{IDLE_DB}"}))
    return create_app(settings, store=store, celery=idle)


def images(names=NAMES) -> list[tuple[str, bytes]]:
    return [(name, (SAMPLES / name).read_bytes()) for name in names]


def post_images(client, files, labels=None, query: str = "", model: str = V1, **fields):
    data = {"images": [(io.BytesIO(image), name) for name, image in files], "model": model, **fields}
    if labels is not None:
        data["labels"] = labels
    return client.post(f"/v1/analyses{query}", data=data, content_type="multipart/form-data")


def post_zip(client, archive: bytes, model: str = V1, **fields):
    data = {"archive": (io.BytesIO(archive), "images.zip"), "model": model, **fields}
    return client.post("/v1/analyses", data=data, content_type="multipart/form-data")


def json_body(files, model: str = V1, **fields) -> dict:
    return {"model": model, "images": [{"image": b64(image), "file": name} for name, image in files], **fields}


def download_figures(app, client, job: dict) -> dict[str, bytes]:
    """Every PNG figure the job links to, checked against the contract and the PNG signature."""
    figures = {}
    assert set(job["links"]["figures"]) == set(job["result"]["figures"]) - {"report"}
    for name, url in job["links"]["figures"].items():
        response = checked(app, client.get(url))
        assert response.status_code == 200, name
        assert response.mimetype == "image/png", name
        assert response.data.startswith(PNG_SIGNATURE), name
        figures[name] = response.data
    return figures


# -- the flow --------------------------------------------------------------------------------------


def test_skip_ratio_from_a_zip_with_progress_figures_and_cache(app, client, store, analysis_worker):
    files = {f"batch/{name}": data for name, data in images()}
    files["batch/labels.csv"] = ("file,label\n" + "".join(f"{n},{SAMPLE_LABELS[n]}\n" for n in NAMES)).encode()
    archive = make_zip(files)

    response = checked(app, post_zip(client, archive, kind="skip-ratio", batch_size="4"))
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == f"/v1/analyses/{body['id']}"
    assert body["kind"] == "analysis"
    assert body["status"] in {"queued", "running"}
    assert body["model"] == V1
    assert body["parameters"]["analysis"]["kind"] == "skip-ratio"
    assert body["parameters"]["images"] == len(NAMES)
    assert body["parameters"]["labelled"] == len(NAMES)

    seen = watch_progress(store, body["id"])
    job = finished_job(app, client, response.headers["Location"])
    assert job["status"] == "succeeded", job["error"]
    assert seen[0][0] == 0, seen
    assert seen[-1][0] == seen[-1][1] > 0, seen
    assert [done for done, _ in seen] == sorted(done for done, _ in seen), seen
    result = job["result"]
    assert result["kind"] == "skip-ratio"
    assert result["images"] == len(NAMES)
    assert [model["name"] for model in result["models"]] == [TINY_MODEL]
    assert result["models"][0]["version"] == "1"
    assert result["data"], result
    assert result["figures"], result
    assert "report" not in job["links"]
    download_figures(app, client, job)

    # A name the result does not have, the report of a kind without one, the report as a PNG: 404s.
    body = problem(app, client.get(f"/v1/analyses/{job['id']}/figures/no-such-figure.png"), 404, "unknown_figure")
    assert all(name in body["detail"] for name in job["links"]["figures"])
    problem(app, client.get(f"/v1/analyses/{job['id']}/report.html"), 404, "no_report")
    problem(app, client.get(f"/v1/analyses/{job['id']}/figures/report.png"), 404, "unknown_figure")

    # The same analysis again: the cached result at once.
    again = checked(app, post_zip(client, archive, kind="skip-ratio", batch_size="4"))
    assert again.status_code == 200
    assert again.get_json()["cached"] is True
    assert again.get_json()["result"] == result

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'classlens_submissions_total{kind="analysis",outcome="queued"}' in metrics
    assert f'classlens_analysis_images_total{{outcome="cached"}} {float(len(NAMES))}' in metrics
    assert f'classlens_jobs_total{{kind="analysis",model="{V1}",status="succeeded"}}' in metrics


def test_attention_distance_from_image_parts(app, client, analysis_worker):
    response = checked(app, post_images(client, images(), query="?wait=60", kind="attention-distance", batch_size="4"))
    assert response.status_code in {200, 202}, response.get_json()
    job = finished_job(app, client, response.headers["Location"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["kind"] == "attention-distance"
    assert job["parameters"]["labelled"] == 0
    assert job["parameters"]["analysis"]["prefix_rows"] == "drop"
    download_figures(app, client, job)


def test_compare_two_versions_with_a_report(app, client, analysis_worker):
    body = json_body(images(), kind="compare", compare_to=TINY_MODEL, batch_size=4)  # compare_to: the newest
    response = checked(app, client.post("/v1/analyses?wait=60", json=body))
    assert response.status_code in {200, 202}, response.get_json()
    job = finished_job(app, client, response.headers["Location"])
    assert job["status"] == "succeeded", job["error"]
    assert job["parameters"]["analysis"]["compare_to"] == V2  # resolved: the content key names a version
    result = job["result"]
    assert [(model["name"], model["version"]) for model in result["models"]] == [(TINY_MODEL, "1"), (TINY_MODEL, "2")]
    assert "report" in result["figures"]
    assert job["links"]["report"] == f"/v1/analyses/{job['id']}/report.html"
    download_figures(app, client, job)

    report = checked(app, client.get(job["links"]["report"]))
    assert report.status_code == 200
    assert report.mimetype == "text/html"
    assert "default-src 'none'" in report.headers["Content-Security-Policy"]
    assert "<html" in report.get_data(as_text=True).lower()


@pytest.mark.parametrize(
    ("kind", "fields", "figures"),
    [
        ("token-probes", {"layer": "1"}, {"token_probes", "token_probes_maps", "token_probes_faithfulness"}),
        ("gradient-parts", {}, {"gradient_parts_blocks", "gradient_parts_heads"}),
        ("significance", {}, {"significance"}),
    ],
)
def test_the_paper_kinds_with_labels(app, client, analysis_worker, kind, fields, figures):
    labels = [str(SAMPLE_LABELS[name]) for name in NAMES]
    response = checked(app, post_images(client, images(), labels, kind=kind, batch_size="4", **fields))
    assert response.status_code in {200, 202}, response.get_json()
    job = finished_job(app, client, response.headers["Location"])
    assert job["status"] == "succeeded", job["error"]
    assert job["parameters"]["analysis"].get("layer") == (1 if fields else None)
    assert set(download_figures(app, client, job)) == figures


def test_cka_against_a_cnn_and_a_kind_the_cnn_cannot_serve(app, client, analysis_worker):
    # The bundled fmnist-resnet is in every catalog: CKA takes any model, attention distance only a ViT.
    body = json_body(images(NAMES[:4]), kind="cka", compare_to="fmnist-resnet", representation="gap", batch_size=4)
    job = finished_job(app, client, checked(app, client.post("/v1/analyses", json=body)).headers["Location"])
    assert job["status"] == "succeeded", job["error"]
    assert [model["name"] for model in job["result"]["models"]] == [TINY_MODEL, "fmnist-resnet"]
    download_figures(app, client, job)

    # The manifest says fmnist-resnet is no ViT (structure: null): refused at submission, nothing queued.
    response = post_images(client, images(NAMES[:4]), model="fmnist-resnet", kind="attention-distance")
    body = problem(app, response, 422, "unsupported_model")
    assert "Vision Transformer" in body["detail"]
    assert "fmnist-resnet@1" in body["detail"]


def test_identical_analyses_in_flight_join_one_job(idle_app):
    client = idle_app.test_client()
    files = images(NAMES[:4])
    # The same images (names, bytes) as parts and as a zip, the same parameters as form fields and JSON.
    fields = {"kind": "attention-distance", "prefix_rows": "renormalise"}
    first = checked(idle_app, post_images(client, files, **fields))
    second = checked(idle_app, post_zip(client, make_zip(dict(files)), **fields))
    third = checked(idle_app, client.post("/v1/analyses", json=json_body(files, **fields)))
    assert first.status_code == second.status_code == third.status_code == 202
    ids = {response.get_json()["id"] for response in (first, second, third)}
    assert len(ids) == 1
    assert first.get_json()["status"] == "queued"
    assert queue_depths(idle_app.extensions["classlens"].celery)[ANALYSIS_QUEUE] == 1
    assert 'classlens_submissions_total{kind="analysis",outcome="joined"} 2.0' in client.get("/metrics").get_data(
        as_text=True
    )
    # Another model version is another analysis.
    other = checked(idle_app, post_images(client, files, model=V2, **fields))
    assert other.status_code == 202
    assert other.get_json()["id"] not in ids


# -- bad input: a 4xx problem, nothing queued ----------------------------------------------------------


def test_unknown_models_are_422_as_for_explanations(app, client):
    body = problem(app, post_images(client, images(), model="nope", kind="skip-ratio"), 422, "unknown_model")
    assert "nope" in body["detail"]
    body = problem(app, post_images(client, images(), kind="cka", compare_to=f"{TINY_MODEL}@9"), 422, "unknown_model")
    assert body["detail"].startswith("compare_to:")


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"kind": "compare"}, "missing_compare_to"),
        ({"kind": "skip-ratio", "compare_to": V2}, "bad_parameter"),
        ({"kind": "probes"}, "missing_labels"),
        ({"kind": "skip-ratio", "region": "0,0,2,2"}, "bad_parameter"),
        ({"kind": "perturb", "region": "0,0,8,2"}, "bad_region"),  # the grid is 7x7
        ({"kind": "perturb", "region": "3,3,3,5"}, "bad_region"),  # empty
        ({"kind": "cka", "batch_size": "2"}, "bad_parameter"),
        ({"kind": "probes", "ridge": "0"}, "bad_parameter"),
        ({"kind": "memories", "top_memories": "99"}, "bad_parameter"),
        ({"kind": "gradient-parts", "layer": "0"}, "bad_parameter"),  # blocks are 1..2
        ({"kind": "gradient-parts", "layer": "3"}, "bad_parameter"),
        ({"kind": "skip-ratio", "layer": "1"}, "bad_parameter"),
        ({"kind": "token-probes"}, "missing_labels"),
        ({"kind": "entropy"}, "invalid_body"),
        ({}, "invalid_body"),
    ],
)
def test_bad_parameters(app, client, fields, name):
    problem(app, post_images(client, images(), **fields), 422, name)


def test_bad_images_and_labels(app, client):
    problem(app, post_images(client, images(NAMES[:3]), kind="skip-ratio"), 422, "too_few_images")
    many = [(f"{i}.png", sample_png()) for i in range(MAX_IMAGES + 1)]
    problem(app, post_images(client, many, kind="skip-ratio"), 422, "too_many_images")
    problem(app, client.post("/v1/analyses", json=json_body(images(NAMES[:2]), kind="cka")), 422, "too_few_images")

    labels = [str(SAMPLE_LABELS[name]) for name in NAMES]
    problem(app, post_images(client, images(), labels[:-1], kind="probes"), 422, "label_count")
    problem(app, post_images(client, images(), [*labels[:-1], "Sock"], kind="probes"), 422, "unknown_label")
    partial = make_zip({**dict(images()), "labels.csv": f"file,label\n{NAMES[0]},{FASHION_LABELS[0]}\n".encode()})
    problem(app, post_zip(client, partial, kind="skip-ratio"), 422, "partial_labels")

    data = noise_png(64)
    files = [*images(NAMES[:4]), ("broken.png", data[: len(data) // 2])]
    body = problem(app, post_images(client, files, kind="skip-ratio"), 422, "truncated")
    assert body["file"] == "broken.png"
    problem(app, post_zip(client, b"not a zip", kind="skip-ratio"), 422, "not_a_zip")
    problem(app, client.post("/v1/analyses", data=b"hello", content_type="text/plain"), 415)

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'classlens_rejected_analyses_total{problem="too_few_images"} 2.0' in metrics


def test_unknown_analysis(app, client):
    for path in ("", "/figures/cka.png", "/figures/report.png", "/report.html"):
        problem(app, client.get(f"/v1/analyses/0123456789abcdef{path}"), 404, "unknown_job")


# -- the task itself, in this process, with a stand-in analysis --------------------------------------


def test_task_progress_figures_and_failures(settings, store, idle_app, monkeypatch):
    import worker.jobs.analysis as analysis
    from worker.analyses.run import AnalysisError, AnalysisOutcome
    from worker.jobs.runtime import runtime as process_runtime

    client = idle_app.test_client()
    seen = []

    def stand_in(request, models, images, labels, progress):
        seen.append((request.kind, [model.ref.version for model in models], len(images), labels))
        for done in range(4):
            progress(done, 3)
        if request.kind == "memories":
            raise AnalysisError("memories need value vectors: not this model")
        return AnalysisOutcome({"layers": [1, 2]}, {"curve": PNG_SIGNATURE + b"curve", "report": b"<html></html>"})

    monkeypatch.setattr(analysis, "run_analysis", stand_in)
    runtime = process_runtime(settings)  # this process's task runtime, on the module's settings

    def run(job_id: str) -> Job:
        job = analysis.analysis_job(runtime, job_id)
        assert job is not None
        return job

    labels = [str(SAMPLE_LABELS[name]) for name in NAMES[:5]]
    queued = checked(idle_app, post_images(client, images(NAMES[:5]), labels, kind="cka", compare_to=V2)).get_json()

    job = run(queued["id"])
    assert job.status == "succeeded", job
    assert job.progress.model_dump() == {"done": 3, "total": 3}, job
    [(kind, versions, count, given)] = seen
    assert (kind, versions, count) == ("cka", ["1", "2"], 5)
    assert given.tolist() == [SAMPLE_LABELS[name] for name in NAMES[:5]]
    view = checked(idle_app, client.get(f"/v1/analyses/{job.id}")).get_json()
    assert view["result"]["data"] == {"layers": [1, 2]}
    assert set(view["result"]["figures"]) == {"curve", "report"}
    assert client.get(view["links"]["figures"]["curve"]).data == PNG_SIGNATURE + b"curve"
    assert client.get(view["links"]["report"]).data == b"<html></html>"

    # A redelivered message for a job already done: nothing recomputed, the job stays succeeded.
    runtime.jobs.save(job.model_copy(update={"status": "running"}))
    assert run(job.id).status == "succeeded"
    assert len(seen) == 1

    # The analysis refuses the request: a failed job with a title and the analysis' own words.
    queued = checked(idle_app, post_images(client, images(NAMES[:4]), kind="memories")).get_json()
    failed = run(queued["id"])
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.title == "The analysis cannot be run"
    assert failed.error.detail == "memories need value vectors: not this model"
    problem(idle_app, client.get(f"/v1/analyses/{failed.id}/figures/curve.png"), 409, "not_ready")

    # The list of images expired before the job ran.
    gone = failed.model_copy(update={"id": "e" * 32, "status": "queued", "content_key": "1" * 64, "error": None})
    runtime.jobs.save(gone.model_copy(update={"parameters": {**gone.parameters, "manifest_key": "missing"}}))
    expired = run(gone.id)
    assert expired.status == "failed"
    assert expired.error is not None
    assert "expired" in expired.error.detail
