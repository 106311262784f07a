"""deploy/prometheus with a real Prometheus (Debian's ``prometheus`` and ``promtool``) over a real service.

The rules and the scrape config are checked by promtool. Then a Prometheus of our own (a free port,
a temporary config and storage; whatever the Debian package's own service does does not matter)
scrapes the embedded service with a real worker through an admin API key, evaluating the shipped
alert rules every second with their ``for`` set to 0 s. A reference audit of the bundled samples is
set; the same samples sent as explanations keep the drift alert quiet, and their inverted copies
(light garments on black become dark on white) make it fire. A missing binary fails the tests.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageOps

from classlens.core.settings import Settings
from classlens.core.store import open_store
from service.auth import hash_key
from tests.service_fixtures import REPO, SAMPLES, TINY_MODEL, b64, free_port, worker_running

pytestmark = pytest.mark.integration

DEPLOY = REPO / "deploy" / "prometheus"
ADMIN_KEY = "clk_monitoring_admin"
MODEL = f"{TINY_MODEL}@1"
SAMPLE_FILES = sorted(path.name for path in SAMPLES.glob("*.png"))


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install Debian's prometheus (make system-deps does it)")
    return found


def test_promtool_accepts_the_alert_rules():
    run = subprocess.run(
        [binary("promtool"), "check", "rules", str(DEPLOY / "alerts.yml")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 6 rules found" in run.stdout


def test_promtool_accepts_the_scrape_config(tmp_path):
    shipped = subprocess.run(
        [binary("promtool"), "check", "config", "--syntax-only", str(DEPLOY / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    # In full, with its token file where the config says (the compose secret) and its rules beside it.
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    token = tmp_path / "token"
    token.write_text("secret\n")
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(token)
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    full = subprocess.run(
        [binary("promtool"), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert full.returncode == 0, full.stdout + full.stderr


@dataclass
class Monitored:
    api: str
    prometheus: str
    settings: Settings


def api_call(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    sent = urllib.request.Request(url, data=data, method=method)
    sent.add_header("Authorization", f"Bearer {ADMIN_KEY}")
    if data is not None:
        sent.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(sent, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def finished(service: Monitored, location: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, job = api_call(f"{service.api}{location}?wait=10")
        assert status in {200, 202}, job
        if job["status"] in {"succeeded", "failed"}:
            assert job["status"] == "succeeded", job
            return job
        assert time.monotonic() < deadline, job


def start_prometheus(work: Path, target: str, port: int) -> subprocess.Popen[bytes]:
    """Our own Prometheus: the shipped config and rules, one-second intervals, ``for: 0s``."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    token = work / "token"
    token.write_text(ADMIN_KEY)
    scrape = config["scrape_configs"][0]
    scrape["authorization"]["credentials_file"] = str(token)
    scrape["static_configs"] = [{"targets": [target]}]
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (work / "alerts.yml").write_text(yaml.safe_dump(rules))
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (work / "prometheus.log").open("wb")
    return subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"prometheus is not ready:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def query(service: Monitored, promql: str) -> list[dict[str, Any]]:
    url = f"{service.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def eventually(service: Monitored, promql: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = query(service, promql)
        if found:
            return found
        assert time.monotonic() < deadline, f"nothing for {promql} after {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[Monitored]:
    """The embedded service (authentication on, drift over the last 20 explanations) and Prometheus scraping it."""
    from waitress.server import create_server

    from service.app import create_app

    work = tmp_path_factory.mktemp("monitoring")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("REDIS_URL", raising=False)
        patch.delenv("CLASSLENS_REDIS_URL", raising=False)
        settings = Settings(
            data_dir=work / "data",
            model_dirs=[tiny_model_root],
            worker_heartbeat_s=1,
            api_keys=f'- {{id: ops, sha256: "{hash_key(ADMIN_KEY)}", scopes: [explain, audit, admin]}}',
            rate_limit="10000/minute",
            drift_window=len(SAMPLE_FILES),
            drift_min_window=len(SAMPLE_FILES),
        )
        store = open_store(settings)
        with worker_running(settings, store, work / "worker.log"):
            port = free_port()
            server = create_server(create_app(settings, store=store), host="127.0.0.1", port=port, threads=4)
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            prometheus_port = free_port()
            prometheus = start_prometheus(work, f"127.0.0.1:{port}", prometheus_port)
            try:
                wait_ready(prometheus, f"http://127.0.0.1:{prometheus_port}", work / "prometheus.log")
                yield Monitored(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prometheus_port}", settings)
            finally:
                prometheus.terminate()
                prometheus.wait(20)
                server.close()
                thread.join(10)


def inverted(name: str) -> bytes:
    picture = ImageOps.invert(Image.open(SAMPLES / name).convert("L"))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def explain_all(service: Monitored, images: list[bytes]) -> None:
    locations = []
    for data in images:
        status, job = api_call(f"{service.api}/v1/explanations", "POST", {"image": b64(data), "model": TINY_MODEL})
        assert status in {200, 202}, job
        locations.append(f"/v1/explanations/{job['id']}")
    for location in locations:
        finished(service, location)


def drift_alerts(service: Monitored) -> list[dict[str, Any]]:
    return query(service, 'ALERTS{alertname="ClassLensDrift", alertstate="firing"}')


def test_the_drift_alert_is_quiet_on_the_reference_images_and_fires_on_shifted_ones(monitored):
    # Prometheus scrapes the API with the admin key from its token file.
    assert eventually(monitored, 'up{job="classlens"} == 1')
    assert eventually(monitored, "classlens_worker_up == 1")

    images = [{"image": b64((SAMPLES / name).read_bytes()), "file": name} for name in SAMPLE_FILES]
    status, audit = api_call(f"{monitored.api}/v1/audits", "POST", {"model": TINY_MODEL, "images": images})
    assert status in {200, 202}, audit
    audit = finished(monitored, f"/v1/audits/{audit['id']}")
    assert all(row["signals"]["explained"] for row in audit["result"]["rows"])
    route = f"{monitored.api}/v1/models/{TINY_MODEL}/versions/1/reference"
    status, reference = api_call(route, "PUT", {"audit": audit["id"]})
    assert status == 200, reference
    assert reference["images"] == len(SAMPLE_FILES)
    assert reference["window"] == 0
    assert reference["drift"] == {}

    # Live traffic like the reference: the drift is computed (and near 0), and the alert stays quiet.
    explain_all(monitored, [(SAMPLES / name).read_bytes() for name in SAMPLE_FILES])
    status, reference = api_call(route)
    assert reference["window"] == len(SAMPLE_FILES)
    assert max(reference["drift"].values()) < 0.05, reference["drift"]
    psi = eventually(monitored, f'classlens_drift_psi{{model="{MODEL}"}}')
    assert {series["metric"]["signal"] for series in psi} >= {"confidence", "margin", "predicted_class"}
    assert eventually(monitored, f'classlens_drift_window{{model="{MODEL}"}} == {len(SAMPLE_FILES)}')
    time.sleep(5)  # several evaluations of the rules
    assert drift_alerts(monitored) == []
    assert eventually(monitored, f'sum(classlens_prediction_confidence_count{{model="{MODEL}"}}) >= 20')
    assert eventually(monitored, f'sum(classlens_predictions_total{{model="{MODEL}"}}) >= 20')

    # The inverted samples fill the window: some signal moves well past the threshold and the alert fires.
    explain_all(monitored, [inverted(name) for name in SAMPLE_FILES])
    status, reference = api_call(route)
    assert max(reference["drift"].values()) > 0.25, reference["drift"]
    firing = eventually(monitored, 'ALERTS{alertname="ClassLensDrift", alertstate="firing"}')
    assert {alert["metric"]["model"] for alert in firing} == {MODEL}
    assert not query(monitored, 'ALERTS{alertname="ClassLensNoWorker"}')
    check_dashboard_queries(monitored)


def test_reference_routes_refuse_what_cannot_be_a_reference(monitored):
    route = f"{monitored.api}/v1/models/{TINY_MODEL}/versions/1/reference"
    status, body = api_call(route, "PUT", {"audit": "no-such-audit"})
    assert (status, body["problem"]) == (404, "unknown_job")
    status, body = api_call(f"{monitored.api}/v1/models/{TINY_MODEL}/versions/9/reference", "PUT", {"audit": "x"})
    assert (status, body["problem"]) == (404, "unknown_model")
    # An explanation is no audit: the same 404 as an unknown id.
    status, job = api_call(
        f"{monitored.api}/v1/explanations", "POST", {"image": b64(inverted(SAMPLE_FILES[0])), "model": TINY_MODEL}
    )
    status, body = api_call(route, "PUT", {"audit": job["id"]})
    assert (status, body["problem"]) == (404, "unknown_job")
    status, _ = api_call(route, "DELETE")
    assert status == 204
    status, body = api_call(route)
    assert (status, body["problem"]) == (404, "no_reference")
    status, _ = api_call(route, "DELETE")
    assert status == 204  # idempotent


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "classlens.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def check_dashboard_queries(monitored: Monitored) -> None:
    """Every panel's query, as Grafana sends it, is valid PromQL for the real Prometheus, and the panels have data."""
    assert len(dashboard_queries()) >= 15
    empty = []
    for title, expr in dashboard_queries():
        promql = expr.replace("$model", ".*").replace("$__rate_interval", "5m")
        try:
            found = query(monitored, promql)
        except urllib.error.HTTPError as error:
            pytest.fail(f"{title}: {promql} is refused: {error.read().decode()[:300]}")
        if not found:
            empty.append(title)
    # With traffic, a reference and a worker, only the error rate (no failed job) and latency may lack data.
    assert set(empty) <= {"Job error rate", "p99 request latency"}, empty
