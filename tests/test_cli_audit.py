"""``classlens audit``: the same audit as ``POST /v1/audits``, locally and with ``--url``.

The reference is the API's own audit of the twenty bundled samples with their labels.csv,
posted by hand (a zip, as any HTTP client would send it) to the real embedded service with a
real worker (``live_service``). The command's rows.csv, report.json and summary.html must hold
the same content: the rows and aggregates are compared whole, so that fields added to a row
are compared too, never a fixed list of columns. Both runs use one torch thread, as the
service's worker does, so that their floats are computed in the same order.
"""

from __future__ import annotations

import html
import io
import json
import re
import time
import zipfile
from pathlib import Path

import pytest
import requests

from classlens.core.audit_report import CSV_COLUMNS
from classlens.core.audit_summary import summary_html
from tests.browser import live_service  # noqa: F401  (the fixture)
from tests.service_fixtures import SAMPLES, sample_png

MODEL = "fmnist-vit"
HOSTILE = '<img src=x onerror="alert(1)">&amp;.png'


def _samples_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(SAMPLES.glob("*.png")):
            archive.write(path, path.name)
        archive.write(SAMPLES / "labels.csv", "labels.csv")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api_audit(live_service) -> dict[str, bytes]:  # noqa: F811
    """The API's audit of the bundled samples: its rows.csv and report.json as downloaded."""
    base = live_service.url
    answer = requests.post(
        f"{base}/v1/audits", files={"archive": ("samples.zip", _samples_zip())}, data={"model": MODEL}, timeout=60
    )
    assert answer.status_code in (200, 202), answer.text
    job = answer.json()
    deadline = time.monotonic() + 300
    while job["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        job = requests.get(f"{base}/v1/audits/{job['id']}?wait=10", timeout=60).json()
    assert job["status"] == "succeeded", job
    rows = requests.get(f"{base}/v1/audits/{job['id']}/rows.csv", timeout=60)
    report = requests.get(f"{base}/v1/audits/{job['id']}/report.json", timeout=60)
    assert rows.status_code == report.status_code == 200
    return {"rows.csv": rows.content, "report.json": report.content}


def _assert_same_as_the_api(out: Path, api: dict[str, bytes]) -> None:
    ours, theirs = json.loads((out / "report.json").read_bytes()), json.loads(api["report.json"])
    assert len(ours["rows"]) == 20
    assert ours["rows"] == theirs["rows"]
    assert ours["aggregates"] == theirs["aggregates"]
    assert ours == theirs
    assert (out / "rows.csv").read_bytes() == api["rows.csv"]
    page = (out / "summary.html").read_text(encoding="utf-8")
    assert page == summary_html(theirs)
    assert f"{100 * theirs['aggregates']['accuracy']:.1f} %" in page
    for row in theirs["rows"]:
        assert html.escape(row["file"]) in page


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


@pytest.mark.integration
def test_audit_with_url_writes_what_the_api_answers(cli, live_service, api_audit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = cli("audit", SAMPLES, "--model", MODEL, "--url", live_service.url, "--out", out)
    assert result.exit_code == 0, result.output
    _assert_same_as_the_api(out, api_audit)


@pytest.mark.integration
def test_audit_without_url_runs_the_same_audit_locally(cli, live_service, api_audit, tmp_path, one_thread):  # noqa: F811
    out = tmp_path / "out"
    result = cli("audit", SAMPLES, "--model", MODEL, "--out", out, "--labels", SAMPLES / "labels.csv")
    assert result.exit_code == 0, result.output
    assert "starting the embedded service" in result.output
    _assert_same_as_the_api(out, api_audit)


@pytest.mark.integration
def test_a_zip_and_a_hostile_file_name(cli, live_service, tmp_path):  # noqa: F811
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as written:
        written.writestr(HOSTILE, sample_png())
        written.writestr("=cmd.png", sample_png())
    labels = tmp_path / "labels.csv"
    labels.write_text(f'file,label\n"{HOSTILE.replace(chr(34), chr(34) * 2)}",Trouser\n')
    out = tmp_path / "out"
    result = cli("audit", archive, "--model", MODEL, "--url", live_service.url, "--labels", labels, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_bytes())
    assert sorted(row["file"] for row in report["rows"]) == sorted([HOSTILE, "=cmd.png"])
    assert next(row for row in report["rows"] if row["file"] == HOSTILE)["true_label"] == "Trouser"
    page = (out / "summary.html").read_text(encoding="utf-8")
    assert "<img" not in page
    assert html.escape(HOSTILE) in page
    assert "<script" not in page
    assert "'=cmd.png" in (out / "rows.csv").read_text()  # the CSV's own rule: no formula


@pytest.mark.integration
@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ("file,label\ntest-00000.png,Not a class\n", "Unknown label"),
        ("name,class\ntest-00000.png,Bag\n", "Bad labels.csv"),
        ("file,label\nmissing.png,Bag\n", "Labels for missing files"),
    ],
)
def test_bad_labels_are_a_clear_error_with_status_2(cli, live_service, tmp_path, labels, words):  # noqa: F811
    given = tmp_path / "labels.csv"
    given.write_text(labels)
    result = cli("audit", SAMPLES, "--model", MODEL, "--url", live_service.url, "--labels", given)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "Traceback" not in result.output


@pytest.mark.integration
def test_an_unknown_model_and_an_unreadable_image_are_status_2(cli, live_service, tmp_path):  # noqa: F811
    result = cli("audit", SAMPLES, "--model", "no-such-model", "--url", live_service.url)
    assert result.exit_code == 2, result.output
    assert "Unknown model" in result.output
    (tmp_path / "broken.png").write_bytes(sample_png()[:40])
    result = cli("audit", tmp_path, "--model", MODEL, "--url", live_service.url)
    assert result.exit_code == 2, result.output
    assert "broken.png" in result.output


def test_a_folder_without_images_is_status_2(cli, tmp_path):
    result = cli("audit", tmp_path, "--model", MODEL, "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert "no image files" in result.output


def test_the_summary_escapes_what_users_name_and_loads_nothing():
    label = "</td><script>alert(1)</script>"
    row = {column: None for column in CSV_COLUMNS} | {"file": "<b>x</b>.png", "predicted_label": label}
    result = {
        "model": {"name": "m<i>", "version": "1", "weights_sha256": "0" * 64},
        "layers": 2,
        "grid": [2, 2],
        "map_kind": "identifiability",
        "relevance_layer": 2,
        "rows": [row],
        "aggregates": {
            "images": 1,
            "labelled": 1,
            "correct": 0,
            "accuracy": 0.0,
            "confusion": [
                {"true_index": 0, "true_label": label, "predicted_index": 1, "predicted_label": "b", "count": 1}
            ],
            "mean_emergence_by_class": [
                {"index": 1, "label": label, "images": 1, "mean_emergence_layer": None, "never": 1}
            ],
            "emergence_histogram": {"0": 0, "1": 0, "2": 0, "never": 1},
            "mean_top1_probability": 0.5,
            "mean_central_share": None,
            "central_cells_share": 0.25,
        },
    }
    page = summary_html(result)
    assert "<script" not in page
    assert "<b>" not in page
    assert "<i>" not in page
    assert page.count(html.escape(label)) == 3  # the confusion row, the class table, the row
    assert "&lt;b&gt;x&lt;/b&gt;.png" in page
    assert not re.search(r"(src|href)=|https?:|<link|<img", page)
