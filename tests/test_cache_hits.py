"""A cache hit's answer: the stored result spliced into the job JSON as it is stored, the same document as before.

The job responses used to parse the stored result and encode it again with the rest of the job
(Flask's ``jsonify``); now the stored bytes go into the body unchanged. Each test compares the
body, parsed, with what the parsing path gives for the same job and result, and checks the
response against openapi.yaml. The hit's record, saved with the cache look-up in the same trip,
is checked here too: it is the job a later ``GET`` finds. Real redis-server, no worker: results
are written through the store as the worker writes them (:meth:`JobStore.succeed`).
"""

from __future__ import annotations

import copy
import io
import json
import uuid
from pathlib import Path

import pytest
import yaml
from flask import jsonify

from classlens.core import keys
from classlens.core.jobs import JobStore
from classlens.core.settings import Settings
from classlens.core.store import Get, RedisStore, SetIfFound, SqliteStore
from service.views import analysis_view, audit_view, job_view, model_job_view
from tests.service_fixtures import REPO, TINY_MODEL, b64, checked, sample_png

DB = 14  # a Redis database of this module's own
TINY_REFERENCE = f"{TINY_MODEL}@1"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, tiny_model_root):
    """The real app with no worker: what is accepted stays queued until a test finishes it."""
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[tiny_model_root],
        data_dir=tmp_path_factory.mktemp("cache-hits"),
        max_wait_s=0,
    )


@pytest.fixture(scope="module")
def jobs(store, settings) -> JobStore:
    return JobStore(store, ttl_s=settings.result_ttl_s, inflight_ttl_s=60)


def example(name: str) -> dict:
    """One of openapi.yaml's succeeded-job examples (a document the contract accepts)."""
    document = yaml.safe_load((REPO / "openapi.yaml").read_text(encoding="utf-8"))
    return copy.deepcopy(document["components"]["examples"][name]["value"])


def example_result(name: str) -> dict:
    return example(name)["result"]


def explanation_result(top: int) -> bytes:
    """A stored explanation with two targets, as the worker writes it (compact JSON, UTF-8), one label not ASCII."""
    result = example_result("ExplanationSucceeded")
    first = result["targets"][0]
    second = {**copy.deepcopy(first), "index": top, "label": "Sandale – größe 42", "rank": 1}
    result["targets"] = [first, second]
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()


def old_path(app, view, job, result: bytes, *, cached: bool) -> dict:
    """The job JSON as the responses made it before: the result parsed, and all of it encoded by ``jsonify``."""
    with app.test_request_context():
        return json.loads(jsonify(view(job, result, cached=cached)).get_data())


def _hit_setup(client, jobs, image: bytes, *, multipart: bool):
    """Submit ``image`` once (queued: no worker), finish its job as a worker would; the stored result."""
    first = post(client, image, multipart=multipart)
    assert first.status_code == 202, first.get_json()
    job = jobs.get(first.get_json()["id"])
    result = explanation_result(top=7)
    jobs.succeed(job, result)
    return result


def post(client, image: bytes, *, multipart: bool):
    if multipart:
        data = {"model": TINY_MODEL, "image": (io.BytesIO(image), "a.png")}
        return client.post("/v1/explanations", data=data, content_type="multipart/form-data")
    return client.post("/v1/explanations", json={"model": TINY_MODEL, "image": b64(image)})


@pytest.mark.parametrize("multipart", [False, True], ids=["json", "multipart"])
def test_a_cache_hit_answers_the_document_the_old_path_did(app, client, jobs, multipart):
    image = sample_png() + uuid.uuid4().bytes  # an image of this test's own: never explained before
    result = _hit_setup(client, jobs, image, multipart=multipart)

    hit = checked(app, post(client, image, multipart=multipart))
    assert hit.status_code == 200
    assert hit.mimetype == "application/json"
    body = json.loads(hit.get_data())  # the bytes as sent: valid JSON, UTF-8
    job = jobs.get(body["id"])
    assert job is not None, "the hit's record was saved with the look-up"
    assert job.status == "succeeded"
    assert body == old_path(app, job_view, job, result, cached=True)
    assert body["cached"] is True
    assert body["result"] == json.loads(result)
    assert body["result"]["targets"][1]["label"] == "Sandale – größe 42"
    assert body["links"]["maps"] == {
        str(index): f"/v1/explanations/{job.id}/maps/{index}.png"
        for index in (body["result"]["targets"][0]["index"], 7)
    }
    assert hit.headers["Location"] == f"/v1/explanations/{job.id}"

    again = checked(app, client.get(f"/v1/explanations/{job.id}"))
    assert again.status_code == 200
    assert json.loads(again.get_data()) == old_path(app, job_view, job, result, cached=False)


def test_each_hit_gets_a_record_of_its_own(app, client, jobs):
    image = sample_png() + uuid.uuid4().bytes
    _hit_setup(client, jobs, image, multipart=False)
    ids = {post(client, image, multipart=False).get_json()["id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(jobs.get(job_id).status == "succeeded" for job_id in ids)


def _finished(jobs: JobStore, kind: str, parameters: dict, result: bytes):
    submission = jobs.submit(
        kind=kind,  # type: ignore[arg-type]
        model=TINY_REFERENCE,
        parameters=parameters,
        key=uuid.uuid4().hex,
        image_key=None,
        enqueue=lambda job: None,
    )
    return jobs.succeed(submission.job, result)


@pytest.mark.parametrize(
    ("kind", "path", "view", "name"),
    [
        ("audit", "/v1/audits", audit_view, "AuditSucceeded"),
        ("analysis", "/v1/analyses", analysis_view, "AnalysisSucceeded"),
        ("explanation", "/v1/explanations", job_view, "ExplanationSucceeded"),
    ],
)
def test_every_job_kind_answers_the_document_the_old_path_did(app, client, jobs, kind, path, view, name):
    shown = example(name)
    result = json.dumps(shown["result"], ensure_ascii=False).encode()  # with spaces: any JSON is kept as is
    job = _finished(jobs, kind, shown["parameters"], result)
    response = checked(app, client.get(f"{path}/{job.id}"))
    assert response.status_code == 200
    assert json.loads(response.get_data()) == old_path(app, view, job, result, cached=False)


def test_a_model_job_answers_the_document_the_old_path_did(app, jobs):
    shown = example("ModelJobSucceeded")
    result = json.dumps(shown["result"]).encode()
    job = _finished(jobs, "model", shown["parameters"], result)
    from service.job_responses import job_response

    with app.test_request_context():
        from service.app import services

        sent = job_response(services(), job, model_job_view, "models.get_model_job", "model registration")
        body = json.loads(sent.get_data())
    assert body == old_path(app, model_job_view, job, result, cached=False)
    assert body["links"]["model"] == f"/v1/models/{json.loads(result)['reference']}"


# -- the look-up that saves a hit's record -------------------------------------------------------------------


@pytest.fixture(params=["redis", "sqlite"])
def any_store(request, redis_url, tmp_path: Path):
    if request.param == "redis":
        return RedisStore(f"{redis_url}/{DB}")
    return SqliteStore(tmp_path / "store.sqlite3")


def test_set_if_found_sets_only_while_the_other_key_holds_a_value(any_store):
    found, target = f"test:{uuid.uuid4().hex}", f"test:{uuid.uuid4().hex}"
    assert any_store.round_trip([SetIfFound(found, target, b"record", 60), Get(target)]) == [None, None]
    any_store.set(found, b"result", 60)
    assert any_store.round_trip([SetIfFound(found, target, b"record", 60), Get(target)]) == [b"result", b"record"]


def hit_record(key):
    """A cache hit's record for ``key``, made ahead of the look-up as the explanation route makes it."""
    from classlens.core.jobs import cache_hit_record

    return cache_hit_record(kind="explanation", model="m@1", parameters={}, key=key, image_key=None)


def submit_looked_up(jobs, key, found, owner=None):
    """The submission that follows the look-up ``found`` of ``key``, for ``owner``."""
    return jobs.submit(
        kind="explanation",
        model="m@1",
        parameters={},
        key=key,
        image_key=None,
        enqueue=lambda job: None,
        owner=owner,
        looked_up=found,
    )


def test_a_lookup_with_a_record_saves_it_only_on_a_hit(any_store):
    jobs = JobStore(any_store, ttl_s=60, inflight_ttl_s=60)
    key = uuid.uuid4().hex

    missed = hit_record(key)
    assert jobs.lookup(key, record=missed).recorded is None
    assert jobs.get(missed.id) is None, "a miss leaves no record behind"

    jobs.put_result(key, b'{"done": true}')
    hit = hit_record(key)
    found = jobs.lookup(key, record=hit)
    assert (found.result, found.recorded) == (b'{"done": true}', hit)
    assert jobs.get(hit.id) == hit
    submission = submit_looked_up(jobs, key, found)
    assert (submission.outcome, submission.job, submission.result) == ("cached", hit, b'{"done": true}')
    assert submission.cached, "no owner made it and no owner asks: the same caller"
    assert any_store.get(keys.JOB + hit.id) is not None


def test_a_record_made_for_another_owner_is_not_taken_for_the_caller_s(any_store):
    jobs = JobStore(any_store, ttl_s=60, inflight_ttl_s=60)
    key = uuid.uuid4().hex
    jobs.put_result(key, b"{}")
    found = jobs.lookup(key, record=hit_record(key))
    submission = submit_looked_up(jobs, key, found, owner="alice")
    assert submission.job.owner == "alice"
    assert found.recorded is not None
    assert submission.job.id != found.recorded.id
    assert jobs.get(submission.job.id) == submission.job
