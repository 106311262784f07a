"""``/docs`` without a browser: the page, what it loads, and its Content-Security-Policy.

The page is Swagger UI over ``/openapi.yaml``: every operation and every request field must be
in what the page serves or loads, its scripts must all come from the service (none inline),
and Swagger UI's files must come from the installed ``swagger-ui-bundle``, through the one
``/static/{name}`` route of every page's files, versioned by their content.
tests/test_browser_pages.py renders it in Chromium.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from swagger_ui_bundle import swagger_ui_path

from classlens.core.settings import Settings
from service.app import create_app
from tests.service_fixtures import resolve_ref

METHODS = ("get", "post", "put", "patch", "delete")
VENDOR = Path(str(swagger_ui_path))


class Page(HTMLParser):
    """The tags of a page, with their attributes, and the text inside each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text.append(data)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_root):
    data = tmp_path_factory.mktemp("docs")
    return create_app(Settings(redis_url=None, data_dir=data, model_dirs=[tiny_model_root])).test_client()


@pytest.fixture(scope="module")
def page(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    parsed = Page()
    parsed.feed(response.get_data(as_text=True))
    return response, parsed


def directives(policy: str) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}


def test_the_page_allows_scripts_from_the_service_only_and_none_inline(page):
    response, parsed = page
    policy = directives(response.headers["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]
    assert policy["default-src"] == ["'none'"]
    assert all("'unsafe-inline'" not in values and "'unsafe-eval'" not in values for values in policy.values())
    assert policy["connect-src"] == ["'self'"]
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert len(scripts) == 2
    assert all(attrs.get("src", "").startswith("/static/") for attrs in scripts)
    assert "".join(parsed.script_text).strip() == ""
    handlers = [name for _, attrs in parsed.tags for name in attrs if name.startswith("on") or name == "style"]
    assert handlers == []
    assert all(tag != "style" for tag, _ in parsed.tags)


def test_every_asset_the_page_names_is_served_with_its_type(client, page):
    _, parsed = page
    urls = [attrs.get("src") or attrs.get("href") for tag, attrs in parsed.tags if tag in {"script", "link"}]
    assert len(urls) == 5  # Swagger UI's script and stylesheet, the page's own two, the icon
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        expected = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}[Path(url.split("?")[0]).suffix]
        assert response.mimetype == expected, url
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def named(parsed: Page, name: str) -> str:
    """The address the page gives one static file (with its ``?v=`` digest)."""
    urls = [attrs.get("src") or attrs.get("href") or "" for tag, attrs in parsed.tags if tag in {"script", "link"}]
    found = [url for url in urls if url.startswith(f"/static/{name}?v=")]
    assert len(found) == 1, (name, urls)
    return found[0]


def test_swagger_ui_comes_from_the_installed_package_versioned_by_its_content(client, page):
    _, parsed = page
    bundle = named(parsed, "swagger-ui-bundle.js")
    response = client.get(bundle)
    assert response.data == (VENDOR / "swagger-ui-bundle.js").read_bytes()
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert client.get(named(parsed, "swagger-ui.css")).data == (VENDOR / "swagger-ui.css").read_bytes()
    # The same file asked for by another digest (a page of an older release) or none: served, revalidated.
    for stale in ("/static/swagger-ui-bundle.js", "/static/swagger-ui-bundle.js?v=0123456789abcdef"):
        response = client.get(stale)
        assert response.status_code == 200, stale
        assert response.headers["Cache-Control"] == "no-cache", stale
    assert client.get(named(parsed, "docs.js")).headers["Cache-Control"].endswith("immutable")


def test_an_unknown_asset_is_a_404_problem(client):
    for name in ("nothing.js", "index.html", "..%2Fopenapi.py", "swagger-initializer.js", "swagger-ui-bundle.js.map"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 404, name
        assert response.mimetype == "application/problem+json"
    assert client.get("/docs/assets/docs.js").status_code == 404  # one mechanism: the old route is gone


def loaded_contract(client, parsed: Page) -> tuple[str, dict]:
    """The document the page's start script hands Swagger UI: the URL in the page's ``data-spec``."""
    holder = next(attrs for tag, attrs in parsed.tags if attrs.get("id") == "swagger-ui")
    url = holder["data-spec"]
    assert url is not None
    start = client.get(named(parsed, "docs.js")).get_data(as_text=True)
    assert "root.dataset.spec" in start
    text = client.get(url).get_data(as_text=True)
    return text, yaml.safe_load(text)


def request_fields(document: dict, operation: dict) -> set[str]:
    """Every parameter and every top-level body property of an operation, every media type."""

    fields = {resolve_ref(document, parameter)["name"] for parameter in operation.get("parameters", [])}
    for content in operation.get("requestBody", {}).get("content", {}).values():
        fields |= set(resolve_ref(document, content["schema"]).get("properties", {}))
    return fields


def test_every_operation_and_request_field_is_in_what_the_page_loads(client, page):
    response, parsed = page
    text, loaded = loaded_contract(client, parsed)
    repository = Path(__file__).resolve().parents[1] / "openapi.yaml"
    assert text == repository.read_text(encoding="utf-8")
    contract = yaml.safe_load(repository.read_text(encoding="utf-8"))
    html = response.get_data(as_text=True)
    counted = 0
    for path, item in contract["paths"].items():
        for method in (m for m in METHODS if m in item):
            operation = item[method]
            assert loaded["paths"][path][method]["operationId"] == operation["operationId"]
            # The page itself lists it too, for readers without JavaScript.
            assert f"<code>{path}</code>" in html, path
            for field in request_fields(contract, operation):
                assert field in request_fields(loaded, loaded["paths"][path][method]), (path, field)
                counted += 1
    assert counted > 80
    assert {"top_k", "targets", "image", "baseline_maps"} <= request_fields(
        loaded, loaded["paths"]["/v1/explanations"]["post"]
    )
