"""The audit browser: its images route through the Flask client, and the page in a real headless Chromium.

The route serves each row's image exactly as it was uploaded. In the browser, /ui audits the
twenty bundled samples (their labels known); every expectation is read from the audit JSON the
API serves (fetched here apart from the page): the rows, their order when sorted, the rows a
filter leaves, the confusion matrix, the histograms, and the image of the row that is opened.
"""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select

from classlens.core.settings import Settings
from service.app import create_app
from tests.browser import browser, live_service  # noqa: F401
from tests.service_fixtures import FASHION_LABELS, SAMPLES, TINY_MODEL, checked, problem, sample_png

SAMPLE_LABELS = [
    (row["file"], row["label"]) for row in csv.DictReader(io.StringIO((SAMPLES / "labels.csv").read_text()))
]


# -- the images route, through the Flask client -------------------------------------------------------------


def jpeg_of(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_the_images_route_serves_each_row_s_upload_once_the_audit_has_succeeded(tmp_path, tiny_model_root):
    import torch

    from model_store.catalog import Catalog
    from worker.jobs.audit import audit_job
    from worker.jobs.runtime import Runtime
    from worker.runtime import ModelCache

    settings = Settings(redis_url=None, data_dir=tmp_path / "data", model_dirs=[tiny_model_root], max_wait_s=0)
    app = create_app(settings)
    client = app.test_client()
    uploads = [("a.png", sample_png("test-00002.png")), ("b.jpg", jpeg_of(sample_png("test-00019.png")))]
    data = {"images": [(io.BytesIO(image), name) for name, image in uploads], "model": TINY_MODEL}
    job = checked(app, client.post("/v1/audits", data=data, content_type="multipart/form-data")).get_json()
    assert job["status"] == "queued"
    # Before the audit has run: 409, like its other downloads.
    problem(app, client.get(f"/v1/audits/{job['id']}/images/0"), 409, "not_ready")

    # The audit, run in this process by the worker's own code (no worker process listens here).
    parts = app.extensions["classlens"]
    runtime = Runtime(settings, parts.jobs, ModelCache(Catalog([tiny_model_root]), torch.device("cpu")), os.getpid())
    assert audit_job(runtime, job["id"]).status == "succeeded"

    rows = checked(app, client.get(f"/v1/audits/{job['id']}")).get_json()["result"]["rows"]
    assert [row["file"] for row in rows] == [name for name, _ in uploads]
    for index, ((_, sent), media) in enumerate(zip(uploads, ("image/png", "image/jpeg"), strict=True)):
        response = checked(app, client.get(f"/v1/audits/{job['id']}/images/{index}"))
        assert response.status_code == 200
        assert response.mimetype == media
        assert response.get_data() == sent
    body = problem(app, client.get(f"/v1/audits/{job['id']}/images/2"), 404, "unknown_image")
    assert "0 to 1" in body["detail"]
    problem(app, client.get("/v1/audits/0123456789abcdef/images/0"), 404, "unknown_job")
    assert client.get(f"/v1/audits/{job['id']}/images/-1").status_code in {400, 404}


# -- the page, in Chromium ---------------------------------------------------------------------------------


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def visible_rows(driver) -> list[int]:
    return [
        int(tr.get_attribute("data-index"))
        for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr")
        if tr.is_displayed()
    ]


def cell(tr, key: str) -> str:
    return tr.find_element(By.CSS_SELECTOR, f'td[data-key="{key}"]').text


def header(driver, key: str):
    return driver.find_element(By.CSS_SELECTOR, f'#rows-head th[data-key="{key}"]')


def settled(driver) -> bool:
    """The page has loaded its audit (or failed to), or /ui has given up with an error."""
    if "/v1/audits/" in driver.current_url:
        return bool(driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    return "error" in (driver.find_element(By.ID, "status").get_attribute("class") or "")


def open_audit(browser, service) -> str:  # noqa: F811
    """Audit every bundled sample from /ui's button and wait for the audit browser; the audit's id."""
    driver = browser.driver
    driver.get(f"{service.url}/ui")
    model = f"{TINY_MODEL}@1"
    browser.wait(30).until(
        lambda d: any(o.get_attribute("value") == model for o in Select(d.find_element(By.ID, "model")).options)
    )
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    driver.find_element(By.ID, "audit-samples").click()
    browser.wait(180).until(settled)
    status = driver.find_element(By.ID, "status").text
    assert "/v1/audits/" in driver.current_url, f"/ui did not open the audit: {status}"
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", (
        f"{status}\n{service.worker_log.read_text()[-3000:]}"
    )
    return urlparse(driver.current_url).path.split("/")[3]


@pytest.mark.integration
def test_the_audit_browser_shows_sorts_and_filters_the_audit_and_opens_a_row(browser, live_service):  # noqa: F811
    driver = browser.driver
    audit_id = open_audit(browser, live_service)
    job = json.loads(fetch(f"{live_service.url}/v1/audits/{audit_id}"))
    assert job["status"] == "succeeded"
    result = job["result"]
    rows = result["rows"]

    # One row per sample, in upload order, with the labels of labels.csv and the audit's own values.
    assert [(row["file"], row["true_label"]) for row in rows] == SAMPLE_LABELS
    shown = driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr")
    assert len(shown) == len(rows) == 20
    for tr, row in zip(shown, rows, strict=True):
        assert cell(tr, "file") == row["file"]
        assert cell(tr, "true") == row["true_label"]
        assert cell(tr, "predicted") == row["predicted_label"] == FASHION_LABELS[row["predicted_index"]]
        assert cell(tr, "correct") == ("yes" if row["correct"] else "no")
        assert cell(tr, "confidence") == f"{row.get('confidence', row['probability']):.3f}"
        emergence = row["predicted_emergence_layer"]
        assert cell(tr, "emergence") == ("never" if emergence is None else str(emergence))
    assert driver.find_element(By.ID, "shown").text == "Showing 20 of 20 images."
    assert driver.find_element(By.ID, "download-csv").get_attribute("href").endswith(job["links"]["rows_csv"])
    assert driver.find_element(By.ID, "download-json").get_attribute("href").endswith(job["links"]["report"])

    # Sorting by confidence (a click, then again for descending), and by emergence layer from the keyboard.
    def confidence(index: int) -> float:
        return rows[index].get("confidence", rows[index]["probability"])

    order = sorted(range(len(rows)), key=lambda i: (confidence(i), i))
    header(driver, "confidence").find_element(By.TAG_NAME, "button").click()
    assert header(driver, "confidence").get_attribute("aria-sort") == "ascending"
    assert header(driver, "file").get_attribute("aria-sort") == "none"
    assert visible_rows(driver) == order
    header(driver, "confidence").find_element(By.TAG_NAME, "button").click()
    assert header(driver, "confidence").get_attribute("aria-sort") == "descending"
    assert visible_rows(driver) == sorted(range(len(rows)), key=lambda i: (-confidence(i), i))
    header(driver, "emergence").find_element(By.TAG_NAME, "button").send_keys(Keys.ENTER)
    assert header(driver, "emergence").get_attribute("aria-sort") == "ascending"
    layer = [row["predicted_emergence_layer"] for row in rows]
    assert visible_rows(driver) == sorted(
        range(len(rows)), key=lambda i: (float("inf") if layer[i] is None else layer[i], i)
    )

    # Filtering: misclassified only, then one predicted class, then a file name typed in.
    listed = sorted(visible_rows(driver))
    driver.find_element(By.CSS_SELECTOR, "input[name=correctness][value=misclassified]").click()
    wrong = [i for i, row in enumerate(rows) if row["correct"] is False]
    assert sorted(visible_rows(driver)) == wrong
    assert driver.find_element(By.ID, "shown").text == f"Showing {len(wrong)} of 20 images."
    driver.find_element(By.CSS_SELECTOR, "input[name=correctness][value=all]").click()
    predicted = rows[0]["predicted_index"]
    Select(driver.find_element(By.ID, "filter-class")).select_by_value(str(predicted))
    assert sorted(visible_rows(driver)) == [i for i, row in enumerate(rows) if row["predicted_index"] == predicted]
    Select(driver.find_element(By.ID, "filter-class")).select_by_value("")
    driver.find_element(By.ID, "filter-text").send_keys("test-00019")
    assert visible_rows(driver) == [0]
    driver.find_element(By.ID, "filter-text").clear()
    driver.find_element(By.ID, "filter-text").send_keys(Keys.SPACE, Keys.BACKSPACE)  # an input event with no text
    assert sorted(visible_rows(driver)) == listed

    # The confusion matrix: every cell the aggregates' count (0 where they list none); the histograms theirs.
    counts = {(c["true_index"], c["predicted_index"]): c["count"] for c in result["aggregates"]["confusion"]}
    cells = driver.find_elements(By.CSS_SELECTOR, "#confusion tbody td")
    classes = {index for pair in counts for index in pair}
    assert len(cells) == len(classes) ** 2
    for td in cells:
        pair = (int(td.get_attribute("data-true")), int(td.get_attribute("data-predicted")))
        assert int(td.text) == int(td.get_attribute("data-count")) == counts.get(pair, 0), pair
    assert sum(int(td.text) for td in cells) == result["aggregates"]["labelled"] == 20
    bars = driver.find_elements(By.CSS_SELECTOR, "#emergence-histogram li")
    assert {b.get_attribute("data-bin"): int(b.get_attribute("data-count")) for b in bars} == result["aggregates"][
        "emergence_histogram"
    ]
    bins = [
        int(b.get_attribute("data-count")) for b in driver.find_elements(By.CSS_SELECTOR, "#confidence-histogram li")
    ]
    assert bins == [sum(1 for i in range(len(rows)) if min(9, int(confidence(i) * 10)) == k) for k in range(10)]

    # Every thumbnail drawn: the row's image with its map over it.
    browser.wait(60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-thumbnails") == "true")
    drawn = [c.get_attribute("data-drawn") for c in driver.find_elements(By.CSS_SELECTOR, "#rows tbody canvas")]
    assert drawn == ["image and map"] * len(rows)
    assert browser.problems() == []

    driver.execute_script("window.scrollTo(0, 0)")
    narrow = browser.screenshots_at_both_sizes("audit")
    assert browser.problems() == [], f"see {narrow}"
    driver.set_window_size(1280, 800)

    # Opening a row from the keyboard: its image is explained and the viewer opens on it.
    chosen = 3
    row = driver.find_element(By.CSS_SELECTOR, f'#rows tbody tr[data-index="{chosen}"]')
    row.send_keys(Keys.ENTER)

    def viewer_ready(d) -> bool:
        if "/view" in d.current_url and "/v1/explanations/" in d.current_url:
            return bool(d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        return "error" in (d.find_element(By.ID, "status").get_attribute("class") or "")

    browser.wait(120).until(viewer_ready)
    assert "/v1/explanations/" in driver.current_url, driver.find_element(By.ID, "status").text
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
    explanation_id = urlparse(driver.current_url).path.split("/")[3]
    explanation = json.loads(fetch(f"{live_service.url}/v1/explanations/{explanation_id}"))
    assert explanation["model"] == job["model"]
    assert explanation["parameters"]["token_classes"] == 5
    seen = Image.open(io.BytesIO(fetch(f"{live_service.url}/v1/explanations/{explanation_id}/input.png")))
    uploaded = Image.open(SAMPLES / rows[chosen]["file"])
    assert np.array_equal(np.asarray(seen.convert("L")), np.asarray(uploaded.convert("L")))
    assert (
        fetch(f"{live_service.url}/v1/audits/{audit_id}/images/{chosen}")
        == (SAMPLES / rows[chosen]["file"]).read_bytes()
    )
    assert browser.problems() == []
