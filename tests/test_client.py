"""``classlens.client`` against the real embedded service and a real worker process, and its own rules.

The integration tests use ``live_service`` (tests/browser.py): waitress on a loopback port, the
SQLite store and file-system broker, one ``classlens worker`` and the tiny random ViT. The retry
tests run against a small stdlib HTTP server that answers what the test scripts, so that 429s
and their Retry-After are real HTTP too; the input tests build zips and read them back.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest

from classlens.client import ClassLensError, Client, InputError, Job, JobFailed, NotFound, RateLimited
from classlens.client.inputs import batch_body, with_labels, zip_folder
from classlens.core.audit_report import CSV_COLUMNS
from classlens.core.contract import AuditResult, Explanation
from tests.browser import live_service  # noqa: F401  (the fixture)
from tests.service_fixtures import PNG_SIGNATURE, SAMPLES, TINY_DEPTH, TINY_MODEL, sample_png

SAMPLE_FILES = sorted(SAMPLES.glob("*.png"))


@pytest.fixture(scope="module")
def lens(live_service) -> Iterator[Client]:  # noqa: F811
    with Client(live_service.url, timeout=30) as client:
        yield client


# -- against the real service -------------------------------------------------------------------------


@pytest.mark.integration
def test_explain_waits_for_the_typed_explanation(lens):
    explanation = lens.explain(SAMPLE_FILES[0], TINY_MODEL, targets=["Bag", 0], layers=[0, TINY_DEPTH])
    assert isinstance(explanation, Explanation)
    assert explanation.model.name == TINY_MODEL
    assert [target.index for target in explanation.targets] == [8, 0]
    assert set(explanation.targets[0].projection_maps) == {"0", str(TINY_DEPTH)}
    assert explanation.layers == TINY_DEPTH


@pytest.mark.integration
def test_a_submitted_job_is_followed_and_its_maps_are_pngs(lens):
    job = lens.submit_explanation(sample_png(), TINY_MODEL, top_k=2)
    assert isinstance(job, Job)
    assert job.kind == "explanation"
    finished = lens.wait(job, timeout=120)
    assert finished.succeeded
    assert lens.job(job.id).status == "succeeded"
    target = finished.explanation().targets[0]
    by_index = lens.map_png(finished, target.index, layer=TINY_DEPTH)
    assert by_index.startswith(PNG_SIGNATURE)
    # A label is turned into its index from the job's result: the same map, even for "T-shirt/top".
    assert lens.map_png(finished, target.label.upper(), layer=TINY_DEPTH) == by_index
    assert lens.input_png(finished.id).startswith(PNG_SIGNATURE)


@pytest.mark.integration
def test_audit_calls_progress_and_returns_the_typed_result(lens, tmp_path):
    seen: list[tuple[int, int]] = []
    job = lens.audit(SAMPLE_FILES[:6], TINY_MODEL, labels=list(range(6)), progress=lambda *now: seen.append(now))
    assert job.succeeded
    assert seen, "the progress callback was never called"
    assert seen[-1] == (6, 6)
    assert all(done <= total for done, total in seen)
    result = job.audit_result()
    assert isinstance(result, AuditResult)
    assert [row.file for row in result.rows] == [path.name for path in SAMPLE_FILES[:6]]
    assert [row.true_index for row in result.rows] == list(range(6))
    assert result.aggregates.labelled == 6
    csv_text = lens.rows_csv(job)
    assert csv_text.splitlines()[0] == ",".join(CSV_COLUMNS)
    assert len(csv_text.splitlines()) == 7
    assert json.loads(lens.report_json(job)) == job.result


@pytest.mark.integration
def test_analysis_and_its_figure(lens):
    job = lens.analysis("attention-distance", TINY_MODEL, SAMPLE_FILES[:4])
    result = job.analysis_result()
    assert result.kind == "attention-distance"
    assert result.images == 4
    name = next(iter(result.figures))
    assert lens.figure_png(job, name).startswith(PNG_SIGNATURE)


@pytest.mark.integration
def test_models(lens):
    names = {model["name"] for model in lens.models()}
    assert {TINY_MODEL, "fmnist-vit"} <= names
    detail = lens.model(TINY_MODEL)
    assert detail["labels"][8] == "Bag"


@pytest.mark.integration
def test_an_unknown_model_raises_not_found_with_the_problem(lens):
    with pytest.raises(NotFound) as raised:
        lens.model("no-such-model")
    error = raised.value
    assert error.status == 404
    assert error.title
    assert error.detail
    assert error.problem == error.body["problem"]
    assert error.problem


@pytest.mark.integration
def test_submissions_refused_raise_the_problem_fields(lens):
    with pytest.raises(ClassLensError) as raised:
        lens.explain(b"this is not an image", TINY_MODEL)
    assert raised.value.status == 422
    assert raised.value.client_error
    assert raised.value.problem == raised.value.body["problem"]
    with pytest.raises(ClassLensError) as raised:
        lens.explain(sample_png(), "no-such-model")
    assert (raised.value.status, raised.value.problem) == (422, "unknown_model")
    with pytest.raises(ClassLensError) as raised:
        lens.audit(SAMPLE_FILES[:2], TINY_MODEL, labels=["Bag", "Not a class"])
    assert raised.value.problem == "unknown_label"
    assert raised.value.body["labels"] == ["Not a class"]
    with pytest.raises(NotFound):
        lens.job("0" * 32, kind="audit")


@pytest.mark.integration
def test_a_service_that_is_not_there():
    with Client("http://127.0.0.1:9", timeout=2) as nowhere:
        assert not nowhere.ready()
        with pytest.raises(ClassLensError, match="Cannot reach the service") as raised:
            nowhere.models()
    assert raised.value.status is None


# -- retries, against a scripted HTTP server ------------------------------------------------------------


class Scripted(ThreadingHTTPServer):
    """Answers each request with the next ``(status, headers, body)`` of ``script``; counts the requests."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict]]):
        self.script = list(script)
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler) -> None:
                self.requests.append(handler.path)
                status, headers, body = self.script.pop(0) if len(self.script) > 1 else self.script[0]
                data = json.dumps(body).encode()
                handler.send_response(status)
                kind = "application/problem+json" if status >= 400 else "application/json"
                handler.send_header("Content-Type", kind)
                handler.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    handler.send_header(name, value)
                handler.end_headers()
                handler.wfile.write(data)

            def log_message(handler, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def scripted() -> Iterator[Callable[[list[tuple[int, dict[str, str], dict]]], Scripted]]:
    """Start a :class:`Scripted` server for a script; every one started is shut down after the test."""
    servers: list[Scripted] = []

    def start(script: list[tuple[int, dict[str, str], dict]]) -> Scripted:
        server = Scripted(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


RATE_LIMITED = {"type": "urn:classlens:problem:rate_limited", "title": "Too many requests", "status": 429}
RATE_LIMITED |= {"detail": "wait", "problem": "rate_limited"}


def test_429_is_retried_after_retry_after(scripted):
    server = scripted([(429, {"Retry-After": "0.2"}, RATE_LIMITED)] * 2 + [(200, {}, {"models": [{"name": "m"}]})])
    started = time.monotonic()
    with Client(server.url, retries=3) as client:
        assert client.models() == [{"name": "m"}]
    assert len(server.requests) == 3
    assert time.monotonic() - started >= 0.4  # it waited as asked, twice


def test_retries_are_bounded_and_the_last_answer_is_raised(scripted):
    server = scripted([(429, {"Retry-After": "0"}, RATE_LIMITED)])
    with Client(server.url, retries=2) as client, pytest.raises(RateLimited) as raised:
        client.models()
    assert len(server.requests) == 3  # the first try and two retries
    assert (raised.value.status, raised.value.problem, raised.value.retry_after) == (429, "rate_limited", 0.0)


def test_a_retry_after_longer_than_allowed_is_raised_at_once(scripted):
    unavailable = {"title": "Store unavailable", "status": 503, "detail": "down", "problem": "store_unavailable"}
    server = scripted([(503, {"Retry-After": "120"}, unavailable)])
    with Client(server.url, max_retry_wait_s=5) as client, pytest.raises(RateLimited) as raised:
        client.models()
    assert len(server.requests) == 1
    assert raised.value.retry_after == 120.0


def test_a_failed_job_raises_job_failed(scripted):
    failed = {
        "id": "j1",
        "kind": "audit",
        "status": "failed",
        "model": "m@1",
        "parameters": {},
        "progress": {"done": 1, "total": 3},
        "error": {"title": "Unreadable image", "detail": "b.png: truncated"},
        "links": {"self": "/v1/audits/j1"},
    }
    server = scripted([(200, {}, failed)])
    queued = Job.from_api({**failed, "status": "queued", "error": None})
    with Client(server.url) as client, pytest.raises(JobFailed) as raised:
        client.wait(queued, timeout=10)
    assert (raised.value.title, raised.value.detail) == ("Unreadable image", "b.png: truncated")
    assert raised.value.job.status == "failed"
    assert server.requests[0].startswith("/v1/audits/j1?wait=")


# -- what is sent ----------------------------------------------------------------------------------------


def test_a_folder_becomes_a_zip_with_its_labels(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(sample_png())
    (tmp_path / "sub" / "b.PNG").write_bytes(sample_png())
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("file,label\na.png,Bag\nsub/b.PNG,3\n")
    with zipfile.ZipFile(BytesIO(zip_folder(tmp_path))) as archive:
        assert sorted(archive.namelist()) == ["a.png", "labels.csv", "sub/b.PNG"]
    given = tmp_path / "other.csv"
    given.write_text("file,label\na.png,0\n")
    with zipfile.ZipFile(BytesIO(zip_folder(tmp_path, given))) as archive:
        assert archive.read("labels.csv") == given.read_bytes()
        assert sorted(archive.namelist()) == ["a.png", "labels.csv", "sub/b.PNG"]


def test_labels_are_appended_to_a_zip_and_lists_go_as_json(tmp_path: Path):
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.png", sample_png())
    appended = with_labels(buffer.getvalue(), {"x.png": "Bag"})
    with zipfile.ZipFile(BytesIO(appended)) as archive:
        assert archive.read("labels.csv").decode().splitlines() == ["file,label", "x.png,Bag"]
        assert archive.read("x.png") == sample_png()
    body = batch_body("m", [("one.png", b"\x01"), ("two.png", b"\x02")], {"two.png": 4}, {"top_k": 2, "layers": None})
    assert body.json == {
        "model": "m",
        "images": [{"image": "AQ==", "file": "one.png"}, {"image": "Ag==", "file": "two.png", "label": 4}],
        "top_k": 2,
    }
    form = batch_body("m", buffer.getvalue(), None, {"targets": ["Bag", 3], "layers": "all"})
    assert form.data == {"model": "m", "targets": "Bag,3", "layers": "all"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        zip_folder(tmp_path / "empty")
    with pytest.raises(InputError, match="2 labels for 1 images"):
        batch_body("m", [("one.png", b"\x01")], [1, 2], {})
