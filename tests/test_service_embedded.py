"""The embedded default: no Redis. SQLite store, filesystem broker and a real worker process."""

import base64
import io

import pytest

from classlens.core.settings import Settings
from classlens.core.store import SqliteStore, open_store
from service.app import create_app
from tests.service_fixtures import TINY_MODEL, sample_png, worker_running


@pytest.fixture
def embedded(tmp_path, tiny_model_root, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CLASSLENS_REDIS_URL", raising=False)
    settings = Settings(data_dir=tmp_path / "data", model_dirs=[tiny_model_root], worker_heartbeat_s=1)
    store = open_store(settings)
    assert isinstance(store, SqliteStore)
    log = tmp_path / "worker.log"
    with worker_running(settings, store, log):
        yield create_app(settings, store=store), log


def test_embedded_job_flow(embedded):
    app, log = embedded
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    data = {"image": (io.BytesIO(sample_png()), "shirt.png"), "model": TINY_MODEL, "top_k": "1"}
    response = client.post("/v1/explanations?wait=60", data=data, content_type="multipart/form-data")
    body = response.get_json()
    assert response.status_code == 200, (body, log.read_text()[-3000:])
    assert body["status"] == "succeeded"
    assert len(body["result"]["targets"]) == 1
    again = client.post(
        "/v1/explanations",
        json={"image": base64.b64encode(sample_png()).decode(), "model": TINY_MODEL, "top_k": 1},
    )
    assert again.status_code == 200
    assert again.get_json()["cached"] is True
