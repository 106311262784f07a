"""The reference routes over the real app and its SQLite store, with audit records written as a worker writes them.

No worker runs: the audits' records and results are put in the store directly, so each refusal
(409 for an unfinished audit, another version's audit, an audit without signals) and the drift
that ``GET`` and ``/metrics`` report are checked exactly, every response against openapi.yaml.
"""

from __future__ import annotations

import time

import pytest

from classlens.core import monitoring
from classlens.core.contract import (
    Job,
    ModelRef,
    Signals,
)
from classlens.core.settings import Settings
from service.app import create_app
from tests.audit_fixtures import audit_result as built_audit
from tests.service_fixtures import TINY_MODEL, checked, problem

MODEL = f"{TINY_MODEL}@1"
ROUTE = f"/v1/models/{TINY_MODEL}/versions/1/reference"


@pytest.fixture
def app(tmp_path, tiny_model_root, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CLASSLENS_REDIS_URL", raising=False)
    settings = Settings(
        data_dir=tmp_path / "data", model_dirs=[tiny_model_root], drift_window=10, drift_min_window=4, max_wait_s=0
    )
    return create_app(settings)


def signals(confidence: float, predicted: int = 1) -> Signals:
    return Signals(
        predicted_index=predicted,
        map_kind="identifiability",
        confidence=confidence,
        margin=confidence / 2,
        explained=True,
        emergence_layer=1,
        identifiability=0.9,
        concentration=0.2,
    )


def audit_result(rows_signals: list[Signals | None]) -> bytes:
    model = ModelRef(name=TINY_MODEL, version="1", weights_sha256="0" * 64)
    return built_audit(model, 2, (7, 7), rows_signals, label="Trouser").model_dump_json().encode()


def put_audit(app, job_id: str, *, model: str = MODEL, status: str = "succeeded", result: bytes | None = None) -> None:
    jobs = app.extensions["classlens"].jobs
    now = time.time()
    job = Job(
        id=job_id,
        kind="audit",
        status="queued",
        created_at=now,
        updated_at=now,
        model=model,
        parameters={},
        content_key=f"key-{job_id}",
    )
    jobs.save(job)
    if status == "succeeded":
        jobs.succeed(job, result or audit_result([signals(0.5)]))
    elif status == "failed":
        jobs.fail(job, "Failed", "it broke")


def test_a_reference_is_set_read_compared_and_removed(app):
    client = app.test_client()
    put_audit(app, "a1", result=audit_result([signals(c) for c in (0.5, 0.6, 0.7, 0.8, 0.9)]))
    body = checked(app, client.put(ROUTE, json={"audit": "a1"})).get_json()
    assert body["model"] == MODEL
    assert body["audit"] == "a1"
    assert body["images"] == 5
    assert (body["window"], body["drift"]) == (0, {})

    store = app.extensions["classlens"].store
    for confidence in (0.5, 0.6, 0.7):  # three: below the minimum window of four, no drift yet
        with store.writes() as writes:
            monitoring.record(writes, MODEL, signals(confidence), window=10, max_classes=50)
    assert checked(app, client.get(ROUTE)).get_json()["drift"] == {}
    assert "classlens_drift_psi{" not in client.get("/metrics").get_data(as_text=True)
    with store.writes() as writes:
        monitoring.record(writes, MODEL, signals(0.8), window=10, max_classes=50)
    drift = checked(app, client.get(ROUTE)).get_json()["drift"]
    assert set(drift) == set(monitoring.DRIFT_SIGNALS)
    assert drift["predicted_class"] == pytest.approx(0.0)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'classlens_drift_window{{model="{MODEL}"}} 4.0' in metrics
    assert f'classlens_drift_psi{{model="{MODEL}",signal="predicted_class"}} 0.0' in metrics
    assert f'classlens_predictions_total{{class="Trouser",model="{MODEL}"}} 4.0' in metrics
    assert f'classlens_prediction_confidence_bucket{{le="0.8",model="{MODEL}"}} 4.0' in metrics

    # Live traffic of another class and a lower confidence: both signals drift.
    for _ in range(10):
        with store.writes() as writes:
            monitoring.record(writes, MODEL, signals(0.15, predicted=7), window=10, max_classes=50)
    drift = checked(app, client.get(ROUTE)).get_json()["drift"]
    assert drift["predicted_class"] > 1
    assert drift["confidence"] > 1

    assert client.delete(ROUTE).status_code == 204
    problem(app, client.get(ROUTE), 404, "no_reference")
    assert "classlens_drift_window{" not in client.get("/metrics").get_data(as_text=True)


def test_what_cannot_be_a_reference_is_refused(app):
    client = app.test_client()
    put_audit(app, "queued", status="queued")
    put_audit(app, "failed", status="failed")
    put_audit(app, "other", model=f"{TINY_MODEL}@2")
    put_audit(app, "old", result=audit_result([None, None]))
    assert "queued" in problem(app, client.put(ROUTE, json={"audit": "queued"}), 409, "not_ready")["detail"]
    problem(app, client.put(ROUTE, json={"audit": "failed"}), 409, "not_ready")
    body = problem(app, client.put(ROUTE, json={"audit": "other"}), 409, "other_model")
    assert f"{TINY_MODEL}@2" in body["detail"]
    problem(app, client.put(ROUTE, json={"audit": "old"}), 409, "no_signals")
    problem(app, client.put(ROUTE, json={"audit": "nothing"}), 404, "unknown_job")
    problem(app, client.put(f"/v1/models/{TINY_MODEL}/versions/7/reference", json={"audit": "queued"}), 404)
    problem(app, client.put(ROUTE, json={"id": "queued"}), 422)
    problem(app, client.get(ROUTE), 404, "no_reference")
