"""The pages people open in a browser, rendered by a real headless Chromium: the analysis report and /docs.

The report is self-contained (no script, no network): Chromium must lay it out, decode every
embedded figure, and show the text. /docs runs Swagger UI from a real server under its strict
Content-Security-Policy: Chromium must render every operation with its request body's fields,
and report no violation nor script error. A missing Chromium fails loudly (``make test``
installs Debian's ``chromium``).
"""

import csv
import io
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from werkzeug.serving import make_server

from classlens.core.contract import AnalysisRequest
from classlens.core.settings import Settings
from model_store.catalog import BUNDLED_SAMPLES
from service.app import create_app
from tests.service_fixtures import resolve_ref
from worker.analyses.run import run_analysis
from worker.runtime import load

SAMPLES = BUNDLED_SAMPLES


def chromium(*arguments: str, url: str) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (Debian: apt install chromium; make test does it)"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *arguments, url]
    result = subprocess.run(command, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result


def rendered(page, tmp_path) -> tuple[str, Image.Image]:
    """The DOM after load, and a screenshot of the top of the page."""
    path = tmp_path / "page.html"
    path.write_bytes(page)
    dom = chromium("--dump-dom", url=path.as_uri()).stdout.decode()
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1000,1400", "--hide-scrollbars", url=path.as_uri())
    return dom, Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")


def coloured_pixels(image: Image.Image) -> int:
    """Pixels far from grey: figures have them, text and table rules do not."""
    rgb = np.asarray(image, dtype=np.int16)
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 60).sum())


@pytest.fixture(scope="module")
def report(bundled_catalog):
    models = [load(bundled_catalog.resolve(name), torch.device("cpu")) for name in ("fmnist-vit@1", "fmnist-vit@2")]
    with (SAMPLES / "labels.csv").open() as stream:
        rows = list(csv.DictReader(stream))[:12]
    images = [Image.open(SAMPLES / row["file"]).convert("L") for row in rows]
    labels = np.array([int(row["label_index"]) for row in rows])
    request = AnalysisRequest(kind="compare", compare_to="fmnist-vit@2", batch_size=4)
    return run_analysis(request, models, images, labels)


def test_the_comparison_report_renders_with_every_figure(report, tmp_path):
    dom, shot = rendered(report.figures["report"], tmp_path)
    figures = re.findall(r'<img[^>]+src="data:image/png;base64,', dom)
    assert len(figures) == len(report.figures) - 1  # every PNG figure, embedded (the report is the rest)
    assert "fmnist-vit@1" in dom
    assert "fmnist-vit@2" in dom
    assert "<table" in dom
    # The first figure (a CKA heatmap) is decoded and drawn: a page of text and tables has no coloured pixels.
    assert coloured_pixels(shot) > 20_000, coloured_pixels(shot)


@pytest.fixture(scope="module")
def served_docs(tmp_path_factory, tiny_model_root):
    """The app on a real port: the page's CSP is a response header, and the page fetches the contract."""
    data = tmp_path_factory.mktemp("docs")
    app = create_app(Settings(redis_url=None, data_dir=data, model_dirs=[tiny_model_root]))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def console_messages(stderr: bytes) -> list[str]:
    """What the page wrote to the console, CSP violations included (Chromium logs them there)."""
    return re.findall(r":CONSOLE[^\]]*\] (.*)", stderr.decode(errors="replace"))


def operation_blocks(dom: str) -> dict[str, str]:
    """Swagger UI's block of each operation, by operationId (its element id ends with it)."""
    starts = [
        (m.start(), m.group(1)) for m in re.finditer(r'<div class="opblock [^"]*" id="operations-[^-"]+-(\w+)"', dom)
    ]
    ends = [start for start, _ in starts[1:]] + [len(dom)]
    return {name: dom[start:end] for (start, name), end in zip(starts, ends, strict=True)}


def test_the_docs_page_renders_every_operation_with_its_request_body_fields(served_docs):
    app, base = served_docs
    page = chromium(
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=8000",
        "--dump-dom",
        url=f"{base}/docs?expand=full&view=schema",
    )
    dom = page.stdout.decode()
    assert console_messages(page.stderr) == []  # no CSP violation, no script error
    contract = app.extensions["classlens"].contract.document
    blocks = operation_blocks(dom)
    missing = []
    for path, item in contract["paths"].items():
        for method in ("get", "post", "delete"):
            if method not in item:
                continue
            operation = item[method]
            block = blocks.get(operation["operationId"])
            if block is None or f'data-path="{path}"' not in block:
                missing.append(f"{method} {path}: not rendered")
                continue
            # Swagger UI shows the first media type of a body (the others are one click away in its select).
            for media, content in list(operation.get("requestBody", {}).get("content", {}).items())[:1]:
                for field in resolve_ref(contract, content["schema"]).get("properties", {}):
                    if not re.search(rf">\s*{re.escape(field)}\s*<", block):
                        missing.append(f"{method} {path} {media}: {field}")
    assert not missing, missing
    assert "top_k" in blocks["createExplanation"]


def test_the_docs_page_shows_the_examples(served_docs):
    """By default (examples first), a deep link opens one operation with its example request: the bundled model."""
    _, base = served_docs
    page = chromium("--virtual-time-budget=8000", "--dump-dom", url=f"{base}/docs#/explanations/createExplanation")
    block = operation_blocks(page.stdout.decode())["createExplanation"]
    assert "fmnist-vit" in block
    assert "iVBORw0KGgo" in block  # the sample PNG, base64
