"""The viewer in a real headless Chromium: /ui submits a bundled sample, the viewer draws its explanation.

Every expectation is read from the result JSON the API serves (fetched here apart from the
page): the map the canvas shows, the classes listed for a patch, the target's rank there, the
map of a class asked for by name. With authentication on, the pages ask for the key and work
once it is typed.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select

from tests.browser import browser, live_service  # noqa: F401
from tests.service_fixtures import SAMPLES, TINY_MODEL

SAMPLE = "test-00019.png"
KEY = "clk_viewer-test-key"


def fetch(url: str, headers: dict[str, str] | None = None, body: dict | None = None) -> bytes:
    """GET ``url`` (or POST ``body`` as JSON) and the answer's bytes."""
    data = None if body is None else json.dumps(body).encode()
    sent = {**(headers or {}), **({"Content-Type": "application/json"} if data else {})}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=sent), timeout=60) as response:
        return bytes(response.read())


def result_of(service, job_id: str) -> dict:
    job = json.loads(fetch(f"{service.url}/v1/explanations/{job_id}", service.headers()))
    assert job["status"] == "succeeded", job
    return job["result"]


def explained_for(service, job_id: str, index: int) -> dict:
    """The explanation of the job's input picture for class ``index``, with the job's own parameters."""
    job = json.loads(fetch(f"{service.url}/v1/explanations/{job_id}", service.headers()))
    picture = fetch(f"{service.url}/v1/explanations/{job_id}/input.png", service.headers())
    request = {name: value for name, value in job["parameters"].items() if value is not None}
    request |= {"targets": [index], "model": job["model"], "image": base64.b64encode(picture).decode()}
    answer = json.loads(fetch(f"{service.url}/v1/explanations", service.headers(), request))
    while answer["status"] not in {"succeeded", "failed"}:
        answer = json.loads(fetch(f"{service.url}/v1/explanations/{answer['id']}?wait=5", service.headers()))
    assert answer["status"] == "succeeded", answer
    return answer["result"]


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

    # The legend names every target's line, as text, with its colour's dash pattern and emergence layer.
    legend = driver.find_elements(By.CSS_SELECTOR, "#legend li")
    assert [int(item.get_attribute("data-index")) for item in legend] == [t["index"] for t in result["targets"]]
    for item, chosen in zip(legend, result["targets"], strict=True):
        assert f"{chosen['label']} (class {chosen['index']})" in item.text
        layer = chosen["emergence_layer"]
        assert ("does not emerge" if layer is None else f"emerges at layer {layer}") in item.text
    assert [item.text.split(": ", 1)[1].split(" line")[0] for item in legend] == ["solid", "dashed", "dotted"]

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

    # Any class by name: one that is not among the job's targets is explained and merged in as a target.
    labels = json.loads(fetch(f"{live_service.url}/v1/models/{TINY_MODEL}@1"))["labels"]
    other = max(set(range(len(labels))) - {t["index"] for t in result["targets"]})
    field = driver.find_element(By.ID, "class-name")
    assert labels[other] in [
        o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#class-names option")
    ]
    field.send_keys(labels[other].upper(), Keys.ENTER)  # any case; Enter submits
    browser.wait(120).until(lambda d: d.find_element(By.ID, "class-status").text.startswith("Showing"))
    assert canvas.get_attribute("data-target") == str(other)
    (added,) = explained_for(live_service, job_id, other)["targets"]
    assert drawn(driver) == expected(added["projection_maps"][str(depth)])
    Select(driver.find_element(By.ID, "kind")).select_by_value("logit")  # the logit sibling has it too
    added_logit = next(
        t for t in explained_for(live_service, query["logit"][0], other)["targets"] if t["index"] == other
    )
    assert drawn(driver) == expected(added_logit["projection_maps"][str(depth)])
    Select(driver.find_element(By.ID, "kind")).select_by_value("identifiability")
    assert Select(driver.find_element(By.ID, "target")).first_selected_option.text.startswith(labels[other])
    assert len(driver.find_elements(By.CSS_SELECTOR, "#legend li")) == len(result["targets"]) + 1
    assert len(driver.find_elements(By.CSS_SELECTOR, "#chart-rank polyline")) == len(result["targets"]) + 1
    # A class already explained is selected, not explained again; an unknown name is said so.
    field.clear()
    field.send_keys(first["label"], Keys.ENTER)
    assert canvas.get_attribute("data-target") == str(first["index"])
    field.clear()
    field.send_keys("no such class", Keys.ENTER)
    status = driver.find_element(By.ID, "class-status")
    assert "no class" in status.text.lower()
    assert "error" in status.get_attribute("class")
    assert browser.problems() == []

    # Keyboard: from the map, Tab walks the controls in reading order; the arrow keys move the layer.
    driver.execute_script("arguments[0].focus()", canvas)
    order = []
    for _ in range(7):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        order.append(driver.switch_to.active_element.get_attribute("id"))
    assert order == ["target", "class-name", "class-show", "stream", "kind", "layer", "opacity"]
    layer = driver.find_element(By.ID, "layer")
    layer.send_keys(Keys.ARROW_LEFT)
    assert canvas.get_attribute("data-layer") == str(depth - 1)
    assert driver.find_element(By.ID, "layer-value").text == str(depth - 1)

    narrow = browser.screenshots_at_both_sizes("viewer")
    assert canvas.size["width"] > 300, f"the map is {canvas.size['width']} px wide at 390 px; see {narrow}"
    assert browser.problems() == [], f"see {narrow}"


@pytest.mark.parametrize("live_service", [KEY], indirect=True)
def test_with_authentication_on_the_pages_ask_for_the_key_and_then_work(browser, live_service):  # noqa: F811
    driver = browser.driver
    driver.get(f"{live_service.url}/ui")
    form = browser.wait(30).until(lambda d: d.find_element(By.ID, "api-key-form"))
    browser.wait(30).until(lambda d: form.is_displayed())
    message = driver.find_element(By.ID, "api-key-message")
    assert "This service asks for an API key" in message.text
    assert driver.switch_to.active_element.get_attribute("id") == "api-key"
    assert [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "model")).options] == [""]
    narrow = browser.screenshot("ui-key", 390, 844)
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"/ui is {overflow} px wider than a 390 px screen; see {narrow}"
    browser.driver.set_window_size(1280, 800)
    refused = browser.problems()  # Chromium logs each answer 401 as an error: those, and nothing else
    assert refused, "the models were listed without a key"
    assert all("401" in line for line in refused), refused

    browser.key_typed("clk_not-a-key")
    browser.wait(30).until(lambda d: "refused" in d.find_element(By.ID, "api-key-message").text)
    assert form.is_displayed()
    assert all("401" in line for line in browser.problems())

    browser.key_typed(KEY)
    browser.wait(30).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 1)
    assert not form.is_displayed()
    assert browser.problems() == []
    # The key is kept in the tab: /ui loaded again, and the viewer it opens, call the API with it.
    job_id, _ = open_viewer(browser, live_service)
    result = result_of(live_service, job_id)
    depth = result["layers"]
    assert drawn(driver) == expected(result["targets"][0]["projection_maps"][str(depth)])
    assert driver.find_elements(By.ID, "api-key-form") == []  # no call was refused: no field shown
    assert browser.problems() == []
