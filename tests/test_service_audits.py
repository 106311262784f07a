"""``/v1/audits`` end to end: the real Flask app, a real redis-server and a real Celery worker on ``audits``.

Every response is validated against openapi.yaml. The worker runs audits in batches of one
image, so that progress can be watched moving from 0 to the total. The tiny random ViT's
predictions mean nothing; what is checked is that rows and aggregates agree with the labels
sent and with each other.
"""

import csv
import io
import math
import struct
import time
import zipfile

import pytest

from classlens.core.contract import Job
from classlens.core.queue import AUDIT_QUEUE
from classlens.core.settings import Settings
from tests.service_fixtures import (
    FASHION_LABELS,
    SAMPLES,
    TINY_DEPTH,
    TINY_MODEL,
    b64,
    checked,
    noise_png,
    problem,
    sample_png,
    worker_running,
)

MAX_IMAGES = 25
MAX_FILE = 1_000_000
MAX_UNCOMPRESSED = 20_000_000
MAX_UPLOAD = 4_000_000
DB = 2  # a Redis database of this module's own, so the explain tests' queues and jobs stay apart

# The bundled Fashion-MNIST samples and their true classes (labels.csv: file,label_index,label).
SAMPLE_LABELS = {
    row["file"]: int(row["label_index"])
    for row in csv.DictReader(io.StringIO((SAMPLES / "labels.csv").read_text()))
    if (SAMPLES / row["file"]).exists()
}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("audit-data"),
        max_upload_bytes=MAX_UPLOAD,
        worker_heartbeat_s=1,
        audit_max_images=MAX_IMAGES,
        audit_max_file_bytes=MAX_FILE,
        audit_max_uncompressed_bytes=MAX_UNCOMPRESSED,
        audit_batch_size=1,
    )


@pytest.fixture(scope="module")
def audit_worker(settings, store, tmp_path_factory):
    with worker_running(
        settings, store, tmp_path_factory.mktemp("audit-worker") / "worker.log", AUDIT_QUEUE
    ) as process:
        yield process


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def post_zip(client, archive: bytes, query: str = "", **fields):
    data = {"archive": (io.BytesIO(archive), "audit.zip"), "model": TINY_MODEL, **fields}
    return client.post(f"/v1/audits{query}", data=data, content_type="multipart/form-data")


def post_images(client, images: list[tuple[str, bytes]], labels: list[str] | None = None, **fields):
    data = {"images": [(io.BytesIO(image), name) for name, image in images], "model": TINY_MODEL, **fields}
    if labels is not None:
        data["labels"] = labels
    return client.post("/v1/audits", data=data, content_type="multipart/form-data")


def finished(app, client, job_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = checked(app, client.get(f"/v1/audits/{job_id}?wait=5")).get_json()
        if body["status"] in {"succeeded", "failed"}:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def check_consistency(result: dict, expected_labels: dict[str, int | None]) -> None:
    """Rows agree with the labels sent; aggregates agree with the rows."""
    rows = result["rows"]
    aggregates = result["aggregates"]
    assert [row["file"] for row in rows] == list(expected_labels)
    for row in rows:
        truth = expected_labels[row["file"]]
        assert row["true_index"] == truth
        assert row["true_label"] == (None if truth is None else FASHION_LABELS[truth])
        assert row["predicted_label"] == FASHION_LABELS[row["predicted_index"]]
        assert row["correct"] == (None if truth is None else row["predicted_index"] == truth)
        assert 0 <= row["probability"] <= 1
        assert row["confidence"] == row["probability"]
        assert row["top_k"][0]["index"] == row["predicted_index"]
        assert row["top_k"][0]["probability"] == pytest.approx(row["confidence"], abs=1e-6)
        probabilities = [score["probability"] for score in row["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 <= row["margin"] <= row["confidence"]
        assert 0 <= row["entropy"] <= math.log(len(FASHION_LABELS)) + 1e-6
        assert row["map_kind"] == result["map_kind"] == "probability"
        assert len(row["map"]) == result["grid"][0]
        assert row["map"][row["peak_row"]][row["peak_col"]] == max(map(max, row["map"]))
        assert row["peak_ties"] == sum(value == max(map(max, row["map"])) for line in row["map"] for value in line)
        if row["region_shares"] is not None:
            assert sum(map(sum, row["region_shares"])) == pytest.approx(1, abs=1e-5)
            assert row["region_shares"][1][1] == pytest.approx(row["central_share"], abs=1e-5)  # 7x7: the same cells
        assert 0 <= row["peak_row"] < result["grid"][0]
        assert 0 <= row["peak_col"] < result["grid"][1]
        if row["central_share"] is not None:
            assert 0 <= row["central_share"] <= 1
            assert row["central_share"] + row["border_share"] == pytest.approx(1, abs=1e-5)
        assert str(result["relevance_layer"]) in row["relevance_by_layer"]
        if truth is not None:
            assert row["explained_index"] == truth  # the default: the true class is explained
    labelled = [row for row in rows if row["true_index"] is not None]
    assert aggregates["images"] == len(rows)
    assert aggregates["labelled"] == len(labelled)
    assert aggregates["correct"] == sum(1 for row in labelled if row["correct"])
    if labelled:
        assert aggregates["accuracy"] == pytest.approx(aggregates["correct"] / len(labelled), abs=1e-6)
    else:
        assert aggregates["accuracy"] is None
    assert sum(cell["count"] for cell in aggregates["confusion"]) == len(labelled)
    for cell in aggregates["confusion"]:
        expected = sum(
            1
            for row in labelled
            if (row["true_index"], row["predicted_index"]) == (cell["true_index"], cell["predicted_index"])
        )
        assert cell["count"] == expected
    histogram = aggregates["emergence_histogram"]
    assert set(histogram) == {str(layer) for layer in range(TINY_DEPTH + 1)} | {"never"}
    assert sum(histogram.values()) == len(rows)
    assert sum(entry["images"] for entry in aggregates["mean_emergence_by_class"]) == len(rows)
    mean = sum(row["probability"] for row in rows) / len(rows)
    assert aggregates["mean_top1_probability"] == pytest.approx(mean, abs=1e-5)
    assert aggregates["mean_margin"] == pytest.approx(sum(row["margin"] for row in rows) / len(rows), abs=1e-5)
    assert aggregates["mean_entropy"] == pytest.approx(sum(row["entropy"] for row in rows) / len(rows), abs=1e-5)
    assert aggregates["central_cells_share"] == pytest.approx(9 / 49, abs=1e-6)  # 7x7 grid: the central 3x3


def watch_progress(store, job_id: str, timeout_s: float = 180) -> list[int]:
    """Every distinct ``progress.done`` seen in the job record, read straight from the store, until it finishes."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = Job.model_validate_json(store.get(f"job:{job_id}"))
        if not seen or seen[-1] != job.progress.done:
            seen.append(job.progress.done)
        if job.status in {"succeeded", "failed"}:
            return seen
        time.sleep(0.001)
    pytest.fail(f"audit {job_id} did not finish; progress seen: {seen}")


# -- the flow --------------------------------------------------------------------------------------


def test_zip_with_labels_end_to_end(app, client, store, audit_worker):
    names = sorted(SAMPLE_LABELS)[:12]
    files = {f"audit/{name}": (SAMPLES / name).read_bytes() for name in names}
    # labels.csv in the same folder, labels as names and as indices; one image left unlabelled.
    lines = ["file,label"] + [
        f"{name},{FASHION_LABELS[SAMPLE_LABELS[name]] if i % 2 else SAMPLE_LABELS[name]}"
        for i, name in enumerate(names[:-1])
    ]
    files["audit/labels.csv"] = ("\n".join(lines) + "\n").encode()
    files["__MACOSX/audit/._test.png"] = b"resource fork"
    files["audit/.DS_Store"] = b"finder"
    archive = make_zip(files)

    response = checked(app, post_zip(client, archive))
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["kind"] == "audit"
    assert body["progress"] == {"done": 0, "total": len(names)}
    assert body["parameters"]["images"] == len(names)
    assert body["parameters"]["labelled"] == len(names) - 1
    assert response.headers["Location"] == f"/v1/audits/{body['id']}"

    seen = watch_progress(store, body["id"])
    assert seen[0] == 0, seen
    assert seen[-1] == len(names), seen
    assert seen == sorted(seen), f"no intermediate progress seen: {seen}"
    assert len(seen) >= 3, f"no intermediate progress seen: {seen}"

    job = finished(app, client, body["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"done": len(names), "total": len(names)}
    result = job["result"]
    assert result["model"]["name"] == TINY_MODEL
    assert result["grid"] == [7, 7]
    assert result["layers"] == TINY_DEPTH
    assert result["relevance_layer"] == TINY_DEPTH
    expected = {f"audit/{name}": SAMPLE_LABELS[name] for name in names[:-1]} | {f"audit/{names[-1]}": None}
    check_consistency(result, expected)

    rows_csv = checked(app, client.get(job["links"]["rows_csv"]))
    assert rows_csv.status_code == 200
    assert rows_csv.mimetype == "text/csv"
    assert rows_csv.headers["Content-Disposition"].startswith("attachment")
    parsed = list(csv.DictReader(io.StringIO(rows_csv.get_data(as_text=True))))
    assert len(parsed) == len(names)
    for line, row in zip(parsed, result["rows"], strict=True):
        assert line["file"] == row["file"]
        assert line["predicted_index"] == str(row["predicted_index"])
        assert line["correct"] == {True: "true", False: "false", None: ""}[row["correct"]]
        assert line["margin"] == str(row["margin"])
        assert line["map_kind"] == row["map_kind"]
        assert line["top_k"] == ";".join(f"{score['label']}:{score['probability']}" for score in row["top_k"])

    report = checked(app, client.get(job["links"]["report"]))
    assert report.status_code == 200
    assert report.headers["Content-Disposition"].startswith("attachment")
    assert report.get_json() == result

    # The same audit again: the cached result at once, no new work.
    again = checked(app, post_zip(client, archive))
    assert again.status_code == 200
    assert again.get_json()["cached"] is True
    assert again.get_json()["result"] == result

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'classlens_submissions_total{kind="audit",outcome="queued"} 1.0' in metrics
    assert f'classlens_audit_images_total{{outcome="queued"}} {float(len(names))}' in metrics
    assert f'classlens_jobs_total{{kind="audit",model="{TINY_MODEL}@1",status="succeeded"}}' in metrics


def test_multipart_images_with_labels(app, client, audit_worker):
    names = sorted(SAMPLE_LABELS)[-5:]
    images = [(name, (SAMPLES / name).read_bytes()) for name in names]
    labels = [FASHION_LABELS[SAMPLE_LABELS[name]].upper() for name in names]  # names match case-insensitively
    response = checked(app, post_images(client, images, labels, layers="0"))
    assert response.status_code in {200, 202}, response.get_json()
    job = finished(app, client, response.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert job["parameters"]["explain"]["layers"] == [0, TINY_DEPTH]  # the last layer is always added
    check_consistency(job["result"], {name: SAMPLE_LABELS[name] for name in names})
    assert all(set(row["relevance_by_layer"]) == {"0", str(TINY_DEPTH)} for row in job["result"]["rows"])


def test_json_images_with_targets_and_no_labels(app, client, audit_worker):
    body = {
        "model": TINY_MODEL,
        "images": [{"image": b64(sample_png()), "file": "a.png"}, {"image": b64(noise_png(28))}],
        "targets": ["Bag"],
    }
    response = checked(app, client.post("/v1/audits?wait=60", json=body))
    job = finished(app, client, response.get_json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    check_consistency(result, {"a.png": None, "image-0002": None})
    assert all(row["explained_index"] == FASHION_LABELS.index("Bag") for row in result["rows"])
    assert result["aggregates"]["accuracy"] is None
    assert result["aggregates"]["confusion"] == []


# -- bad input: a 4xx problem, nothing queued ----------------------------------------------------------


def test_zip_bomb_by_declared_size(app, client):
    archive = bytearray(make_zip({"a.png": sample_png()}))
    central = archive.index(b"PK\x01\x02")
    archive[central + 24 : central + 28] = struct.pack("<I", 0x7FFF_0000)  # uncompressed size: ~2 GB
    problem(app, post_zip(client, bytes(archive)), 422, "zip_too_large")


def test_zip_bomb_by_real_compression(app, client):
    # ~21 MB of zeros deflate to ~20 kB: refused from the central directory before inflating anything.
    archive = make_zip({f"zeros-{i}.png": b"\x00" * 700_000 for i in range(30)})
    assert len(archive) < 100_000
    problem(app, post_zip(client, archive), 422, "zip_too_large")


def test_zip_with_thousands_of_entries(app, client):
    archive = make_zip({f"e{i}.png": b"" for i in range(2500)}, compression=zipfile.ZIP_STORED)
    problem(app, post_zip(client, archive), 422, "zip_too_many_entries")


def test_zip_file_too_large(app, client):
    problem(app, post_zip(client, make_zip({"big.png": b"\x00" * (MAX_FILE + 1)})), 422, "zip_file_too_large")


@pytest.mark.parametrize("name", ["../evil.png", "ok/../../evil.png", "/etc/evil.png", "C:/evil.png", "..\\evil.png"])
def test_zip_path_traversal(app, client, name):
    body = problem(app, post_zip(client, make_zip({"a.png": sample_png(), name: sample_png()})), 422, "unsafe_path")
    assert body["file"] == name


def test_corrupt_image_in_zip_names_the_file(app, client):
    data = noise_png(64)
    archive = make_zip({"good.png": sample_png(), "sub/bad.png": data[: len(data) // 2]})
    body = problem(app, post_zip(client, archive), 422, "truncated")
    assert body["file"] == "sub/bad.png"
    assert "sub/bad.png" in body["detail"]
    body = problem(app, post_zip(client, make_zip({"notes.txt": b"hello"})), 422, "unreadable")
    assert body["file"] == "notes.txt"


def test_too_many_images(app, client):
    many = {f"{i}.png": sample_png() for i in range(MAX_IMAGES + 1)}
    problem(app, post_zip(client, make_zip(many)), 422, "too_many_images")
    problem(app, post_images(client, list(many.items())), 422, "too_many_images")
    body = {"model": TINY_MODEL, "images": [{"image": b64(sample_png())}] * (MAX_IMAGES + 1)}
    problem(app, client.post("/v1/audits", json=body), 422, "too_many_images")


def test_unknown_labels_are_named(app, client):
    labels_csv = b"file,label\na.png,Trousers\nb.png,42\nc.png,Bag\n"
    archive = make_zip({"a.png": sample_png(), "b.png": sample_png(), "c.png": sample_png(), "labels.csv": labels_csv})
    body = problem(app, post_zip(client, archive), 422, "unknown_label")
    assert "Trousers" in body["detail"]
    assert "42" in body["detail"]
    assert body["labels"] == ["42", "Trousers"]
    problem(app, post_images(client, [("a.png", sample_png())], ["Sock"]), 422, "unknown_label")


def test_labels_follow_the_rule_targets_follow(app, client):
    """A label names a class as a target does: ASCII digits an index, else a label in any case and spacing."""
    images = [("a.png", sample_png()), ("b.png", sample_png()), ("c.png", sample_png()), ("d.png", sample_png())]
    refused = problem(app, post_images(client, images, ["²", " 3 ", "  COAT", "Sock"]), 422, "unknown_label")
    assert refused["labels"] == ["Sock", "²"]
    body = {"model": TINY_MODEL, "images": [{"image": b64(sample_png()), "label": label} for label in (" coat ", 10)]}
    assert problem(app, client.post("/v1/audits", json=body), 422, "unknown_label")["labels"] == ["10"]


def _rejected(client, name: str) -> float:
    line = f'classlens_rejected_audits_total{{problem="{name}"}} '
    metrics = client.get("/metrics").get_data(as_text=True).splitlines()
    return next((float(row[len(line) :]) for row in metrics if row.startswith(line)), 0.0)


def test_refused_audits_are_counted_by_problem(app, client):
    before = {name: _rejected(client, name) for name in ("unknown_label", "unknown_class", "not_a_zip")}
    problem(app, post_images(client, [("a.png", sample_png())], ["Sock"]), 422, "unknown_label")
    problem(app, post_images(client, [("a.png", sample_png())], targets="Sock"), 422, "unknown_class")
    problem(app, post_zip(client, b"not a zip"), 422, "not_a_zip")
    assert {name: _rejected(client, name) - count for name, count in before.items()} == {
        "unknown_label": 1,
        "unknown_class": 1,
        "not_a_zip": 1,
    }


def test_labels_csv_problems(app, client):
    problem(app, post_zip(client, make_zip({"a.png": sample_png(), "labels.csv": b"name,class\n"})), 422, "bad_labels")
    stray = make_zip({"a.png": sample_png(), "labels.csv": b"file,label\nb.png,1\n"})
    problem(app, post_zip(client, stray), 422, "bad_labels")


def test_not_a_zip(app, client):
    problem(app, post_zip(client, b"hello, not a zip"), 422, "not_a_zip")
    problem(app, post_zip(client, sample_png()), 422, "not_a_zip")


def test_bad_requests(app, client):
    problem(app, client.post("/v1/audits", data={"model": TINY_MODEL}, content_type="multipart/form-data"), 422)
    problem(app, post_images(client, [("a.png", sample_png()), ("b.png", sample_png())], ["1"]), 422, "label_count")
    problem(app, post_zip(client, make_zip({"dir/": b""})), 422, "missing_images")
    body = {"model": "nope", "images": [{"image": b64(sample_png())}]}
    problem(app, client.post("/v1/audits", json=body), 422, "unknown_model")
    problem(app, client.post("/v1/audits", json={"model": TINY_MODEL, "images": []}), 422)
    problem(app, client.post("/v1/audits", json={"model": TINY_MODEL, "images": [{"image": "@@"}]}), 422)
    body = {"model": TINY_MODEL, "images": [{"image": b64(sample_png())}], "layers": [TINY_DEPTH + 1]}
    problem(app, client.post("/v1/audits", json=body), 422, "bad_parameter")


def test_unknown_audit(app, client):
    problem(app, client.get("/v1/audits/0123456789abcdef"), 404, "unknown_job")
    problem(app, client.get("/v1/audits/0123456789abcdef/rows.csv"), 404, "unknown_job")
    problem(app, client.get("/v1/audits/0123456789abcdef/report.json"), 404, "unknown_job")


def test_redelivery_is_idempotent_and_failures_are_recorded(app, client, settings, store, audit_worker):
    from worker.jobs.audit import audit_job
    from worker.jobs.runtime import runtime as process_runtime

    body = {"model": TINY_MODEL, "images": [{"image": b64(sample_png("test-00003.png")), "label": 1}]}
    job = finished(app, client, checked(app, client.post("/v1/audits?wait=60", json=body)).get_json()["id"])
    assert job["status"] == "succeeded"
    # This process's task runtime on the module's settings (another module's settings get their own).
    runtime = process_runtime(settings)
    record = runtime.jobs.get(job["id"])
    # A redelivered message for a job already done: nothing recomputed, the job stays succeeded.
    runtime.jobs.save(record.model_copy(update={"status": "running"}))
    assert audit_job(runtime, job["id"]).status == "succeeded"
    assert checked(app, client.get(f"/v1/audits/{job['id']}")).get_json()["result"] == job["result"]
    # A job whose list of images expired fails with a title and a detail that say so.
    gone = record.model_copy(update={"id": "f" * 32, "status": "queued", "content_key": "0" * 64})
    runtime.jobs.save(gone.model_copy(update={"parameters": {**gone.parameters, "manifest_key": "missing"}}))
    failed = audit_job(runtime, gone.id)
    assert failed.status == "failed"
    assert failed.error.title
    assert "expired" in failed.error.detail
    view = checked(app, client.get(f"/v1/audits/{gone.id}")).get_json()
    assert view["status"] == "failed"
    assert view["error"]["detail"] == failed.error.detail
    problem(app, client.get(f"/v1/audits/{gone.id}/rows.csv"), 409, "not_ready")
