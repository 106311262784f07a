"""The viewer in a real headless Chromium: /ui submits a bundled sample, the viewer draws its explanation.

Every expectation is read from the result JSON the API serves (fetched here apart from the
page): the map the canvas shows, the classes listed for a patch, the target's rank there.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select

from tests.browser import browser, live_service  # noqa: F401
from tests.service_fixtures import SAMPLES, TINY_MODEL

SAMPLE = "test-00019.png"


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def result_of(service, job_id: str) -> dict:
    job = json.loads(fetch(f"{service.url}/v1/explanations/{job_id}"))
    assert job["status"] == "succeeded", job
    return job["result"]


def drawn(driver) -> list[str]:
    return driver.find_element(By.ID, "map").get_attribute("data-drawn").split(",")


def expected(grid: list[list[float]]) -> list[str]:
    return [f"{value:.4f}" for value in np.asarray(grid, dtype=np.float64).ravel()]


def pixels(driver) -> np.ndarray:
    """The canvas's pixels as drawn (RGB), read back from the page as a PNG."""
    url = driver.execute_script("return document.getElementById('map').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def hover(driver, row: int, column: int, grid: tuple[int, int]) -> None:
    """Point the mouse at the centre of a patch (selenium's offsets are from the element's centre)."""
    canvas = driver.find_element(By.ID, "map")
    size = canvas.size
    dx = (column + 0.5) / grid[1] * size["width"] - size["width"] / 2
    dy = (row + 0.5) / grid[0] * size["height"] - size["height"] / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(dx), int(dy)).perform()


def listed(driver) -> list[int]:
    return [
        int(item.get_attribute("data-index")) for item in driver.find_elements(By.CSS_SELECTOR, "#patch-classes li")
    ]


def settled(driver) -> bool:
    """The viewer has loaded (or failed to), or /ui has given up with an error."""
    if "/view" in driver.current_url:
        return bool(driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    return "error" in (driver.find_element(By.ID, "status").get_attribute("class") or "")


def open_viewer(browser, service) -> tuple[str, dict[str, list[str]]]:  # noqa: F811
    """Submit the sample from /ui and wait for the viewer; the job id and the view's query."""
    driver = browser.driver
    driver.get(f"{service.url}/ui")
    wait = browser.wait(30)
    model = f"{TINY_MODEL}@1"
    wait.until(lambda d: any(o.get_attribute("value") == model for o in Select(d.find_element(By.ID, "model")).options))
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    Select(driver.find_element(By.ID, "sample")).select_by_value(SAMPLE)
    driver.find_element(By.ID, "submit").click()
    browser.wait(120).until(settled)
    status = driver.find_element(By.ID, "status").text
    assert "/view" in driver.current_url, (
        f"/ui did not open the viewer: {status}\n{service.worker_log.read_text()[-3000:]}"
    )
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", status
    address = urlparse(driver.current_url)
    return address.path.split("/")[3], parse_qs(address.query)


def test_the_viewer_draws_the_explanation_it_was_sent(browser, live_service):  # noqa: F811
    driver = browser.driver
    job_id, query = open_viewer(browser, live_service)
    result = result_of(live_service, job_id)
    logit = result_of(live_service, query["logit"][0])
    assert logit["map_kind"] == "logit"
    grid = tuple(result["grid"])
    depth = result["layers"]
    canvas = driver.find_element(By.ID, "map")
    first, second = result["targets"][:2]

    # The page's input picture is the sample as the network saw it (28x28 grey: unchanged).
    picture = Image.open(io.BytesIO(fetch(f"{live_service.url}/v1/explanations/{job_id}/input.png")))
    assert np.array_equal(np.asarray(picture.convert("L")), np.asarray(Image.open(SAMPLES / SAMPLE).convert("L")))

    # It opens at the last layer, with the request's own map kind, for the first target.
    assert canvas.get_attribute("data-layer") == str(depth)
    assert canvas.get_attribute("data-kind") == "identifiability"
    assert drawn(driver) == expected(first["projection_maps"][str(depth)])

    # The layer slider, by keyboard: Home goes to the embedding, and the drawn map is layer 0's.
    before = pixels(driver)
    driver.find_element(By.ID, "layer").send_keys(Keys.HOME)
    assert canvas.get_attribute("data-layer") == "0"
    assert drawn(driver) == expected(first["projection_maps"]["0"])
    after = pixels(driver)
    assert after.shape == before.shape
    assert (after != before).any(axis=-1).mean() > 0.1, "moving the layer slider did not change the drawn map"

    # Hovering a patch lists its top-5 classes at this layer, and the target's rank at each layer.
    row, column = 3, 4
    token = row * grid[1] + column
    hover(driver, row, column, grid)
    assert canvas.get_attribute("data-patch") == str(token)
    assert listed(driver) == result["token_classes"]["residual"][0][token][:5]
    classes = len(json.loads(fetch(f"{live_service.url}/v1/models/{TINY_MODEL}@1"))["labels"])
    ranks = [
        f"{layer}: {round((1 - np.asarray(values).ravel()[token]) * classes)}"
        for layer, values in first["projection_maps"].items()
    ]
    assert driver.find_element(By.ID, "patch-ranks").text == " · ".join(ranks)

    # Another target: its own map.
    Select(driver.find_element(By.ID, "target")).select_by_index(1)
    assert canvas.get_attribute("data-target") == str(second["index"])
    assert drawn(driver) == expected(second["projection_maps"]["0"])

    # The logit map of the sibling job.
    Select(driver.find_element(By.ID, "kind")).select_by_value("logit")
    logit_second = next(t for t in logit["targets"] if t["index"] == second["index"])
    assert drawn(driver) == expected(logit_second["projection_maps"]["0"])

    # The attention stream: layers 1..L, the map of the target's place among each token's classes.
    Select(driver.find_element(By.ID, "stream")).select_by_value("attention")
    assert canvas.get_attribute("data-stream") == "attention"
    assert canvas.get_attribute("data-kind") == "topk"
    assert canvas.get_attribute("data-layer") == "1"
    attention = result["token_classes"]["attention"][0]  # a_1
    places = [(5 - c.index(second["index"])) / 5 if second["index"] in c else 0.0 for c in attention]
    assert drawn(driver) == [f"{value:.4f}" for value in places]
    hover(driver, row, column, grid)
    assert listed(driver) == attention[token][:5]
    assert driver.find_element(By.ID, "chart-identifiability").get_attribute("data-stream") == "attention"

    # The charts: one line per target in each, and the emergence layers marked.
    for chart in ("chart-rank", "chart-identifiability", "chart-top1"):
        lines = driver.find_elements(By.CSS_SELECTOR, f"#{chart} polyline")
        assert len(lines) == len(result["targets"]), chart
    marked = [
        int(m.get_attribute("data-emergence"))
        for m in driver.find_elements(By.CSS_SELECTOR, "#chart-rank [data-emergence]")
    ]
    assert marked == [t["emergence_layer"] for t in result["targets"] if t["emergence_layer"] is not None]

    # Keyboard focus on the map moves the patch with the arrow keys.
    canvas.send_keys(Keys.ARROW_RIGHT)
    assert canvas.get_attribute("data-patch") == str(token + 1)

    # Back to the residual stream: the request's own map kind again, at the last layer (End).
    Select(driver.find_element(By.ID, "stream")).select_by_value("residual")
    Select(driver.find_element(By.ID, "kind")).select_by_value("identifiability")
    driver.find_element(By.ID, "layer").send_keys(Keys.END)
    assert canvas.get_attribute("data-layer") == str(depth)
    assert drawn(driver) == expected(second["projection_maps"][str(depth)])
    hover(driver, row, column, grid)
    assert browser.problems() == []

    wide = browser.screenshot("viewer", 1280, 800)
    assert Image.open(wide).size == (1280, 800), f"screenshot {wide}"
    narrow = browser.screenshot("viewer", 390, 844)
    assert Image.open(narrow).size == (390, 844), f"screenshot {narrow}"
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen; see {narrow}"
    assert canvas.size["width"] > 300, f"the map is {canvas.size['width']} px wide at 390 px; see {narrow}"
    assert browser.problems() == [], f"see {narrow}"
