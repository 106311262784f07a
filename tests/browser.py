"""Browser tests' parts: the real service on a loopback port and a headless Chromium driven by selenium.

``live_service``: the embedded service (SQLite store, filesystem broker; no Redis) with a real
``classlens worker`` process and a tiny ViT, served by waitress on a free port, as
``classlens serve`` serves it; with authentication on when a test asks for a key (indirect
parametrisation: ``@pytest.mark.parametrize("live_service", ["clk_some-key"], indirect=True)``;
the key gets every scope but admin). ``browser``: Debian's ``/usr/bin/chromium`` through its
``/usr/bin/chromedriver``, headless, recording console messages and Content-Security-Policy
violations so that a test can assert there were none (:meth:`Browser.problems`). A missing
Chromium or chromedriver fails the test (``make system-deps`` installs both); it never skips.

Use them from a test module with ``from tests.browser import browser, live_service  # noqa: F401``.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from classlens.core.settings import Settings
from classlens.core.store import open_store
from tests.service_fixtures import free_port, worker_running

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Installed before any page script runs: every CSP violation the page causes, kept for the test to read.
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (event) {
  window.__cspViolations.push(event.violatedDirective + " " + event.blockedURI);
});
"""


@dataclass
class LiveService:
    url: str
    settings: Settings
    worker_log: Path
    key: str | None = None

    def headers(self) -> dict[str, str]:
        """What an API call from the test needs: the key's header when authentication is on."""
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


@pytest.fixture(scope="module")
def live_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path
) -> Iterator[LiveService]:
    """The whole embedded service with one worker process, listening on 127.0.0.1; with a key, it authenticates."""
    from waitress.server import create_server

    from service.app import create_app
    from service.auth import hash_key

    key: str | None = getattr(request, "param", None)
    work = tmp_path_factory.mktemp("live-service")
    keys_file = None
    if key is not None:
        keys_file = work / "keys.yaml"
        entry = {"id": "viewer", "sha256": hash_key(key), "scopes": ["explain", "audit", "analyse"]}
        keys_file.write_text(f"- {json.dumps(entry)}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("REDIS_URL", raising=False)
        patch.delenv("CLASSLENS_REDIS_URL", raising=False)
        settings = Settings(
            data_dir=work / "data", model_dirs=[tiny_model_root], worker_heartbeat_s=1, api_keys_file=keys_file
        )
        store = open_store(settings)
        log = work / "worker.log"
        with worker_running(settings, store, log):
            port = free_port()
            server = create_server(create_app(settings, store=store), host="127.0.0.1", port=port, threads=4)
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            try:
                yield LiveService(f"http://127.0.0.1:{port}", settings, log, key)
            finally:
                server.close()
                thread.join(10)


class Browser:
    """A selenium Chrome driver with the page's console and CSP violations at hand."""

    def __init__(self, driver: Any, artifacts: Path):
        self.driver = driver
        self.artifacts = artifacts

    def wait(self, seconds: float) -> Any:
        """A WebDriverWait that rides out page navigations: an element found on the page being left
        goes stale (or is not there yet on the next), which is a reason to look again, not a failure."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        ignored = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(self.driver, seconds, ignored_exceptions=ignored)

    def key_typed(self, key: str) -> None:
        """Type an API key into the field the pages show when a call answered 401 (service/static/api.js)."""
        from selenium.webdriver.common.by import By

        field = self.wait(30).until(lambda d: d.find_element(By.ID, "api-key"))
        self.wait(10).until(lambda d: field.is_displayed())
        field.send_keys(key)
        self.driver.find_element(By.CSS_SELECTOR, "#api-key-form button[type=submit]").click()

    def problems(self) -> list[str]:
        """Console errors and warnings, and CSP violations, since the last call (the log is drained)."""
        logged = [
            f"{entry['level']}: {entry['message']}"
            for entry in self.driver.get_log("browser")
            if entry["level"] in {"SEVERE", "WARNING"}
        ]
        violations = self.driver.execute_script("return window.__cspViolations || []")
        return logged + [f"CSP violation: {violation}" for violation in violations]

    def screenshot(self, name: str, width: int, height: int) -> Path:
        """The viewport at ``width`` x ``height`` CSS pixels, saved under the test's artifacts folder."""
        self.driver.set_window_size(width, height)
        inner = self.driver.execute_script("return [window.innerWidth, window.innerHeight]")
        # The window's frame takes some pixels: grow it until the viewport itself has the size asked for.
        self.driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])
        path = self.artifacts / f"{name}-{width}x{height}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"
        return path

    def screenshots_at_both_sizes(self, name: str) -> Path:
        """Screenshots at 1280x800 and at a phone's 390x844, the page no wider than the phone; the phone's path.

        The window stays at 390x844, for the caller's own checks of the narrow layout.
        """
        from PIL import Image

        for width, height in ((1280, 800), (390, 844)):
            path = self.screenshot(name, width, height)
            assert Image.open(path).size == (width, height), f"screenshot {path}"
        overflow = self.driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a 390 px screen; see {path}"
        return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """Headless Chromium at 1280x800; fails (never skips) without Debian's chromium and chromium-driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.exists() and shutil.which(binary.name) is None:
            pytest.fail(f"{binary} is missing: install Debian's {package} (make system-deps does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The background-networking flags keep Chromium from dialling out of a closed network at start.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS})
        artifacts = tmp_path / "browser-artifacts"
        artifacts.mkdir()
        yield Browser(driver, artifacts)
    finally:
        driver.quit()
