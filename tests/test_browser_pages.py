"""The pages people open in a browser, rendered by a real headless Chromium: the analysis report and /docs.

Both are self-contained (no script, no network): Chromium must lay them out, decode every
embedded figure, and show the text. A missing Chromium fails loudly (``make test``
installs Debian's ``chromium``).
"""

import csv
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from classlens.core.contract import AnalysisRequest
from classlens.core.settings import Settings
from model_store.catalog import BUNDLED_SAMPLES
from service.app import create_app
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


def colours(image: Image.Image) -> int:
    return len(image.getcolors(maxcolors=1 << 24) or [])


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


def test_the_docs_page_renders_the_whole_contract(tmp_path, tiny_model_root):
    app = create_app(Settings(redis_url=None, data_dir=tmp_path / "data", model_dirs=[tiny_model_root]))
    page = app.test_client().get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    dom, shot = rendered(page.data, tmp_path)
    contract = app.extensions["classlens"].contract.document
    for path in contract["paths"]:
        assert path in dom, path
    assert "<script" not in dom
    assert colours(shot) > 2, "a blank page"
