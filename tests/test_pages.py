"""The pages (/ui, the viewer) without a browser: their security headers, their markup, their files.

The app runs embedded without a worker: a page needs none (its script calls the API).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from classlens.core.settings import Settings
from service.app import create_app
from service.routes.pages import CONTENT_SECURITY_POLICY, MEDIA_TYPES, static_url
from tests.service_fixtures import REPO, SAMPLES

PAGES = (
    "/ui",
    "/v1/explanations/some-job/view",
    "/v1/explanations/some-job/view?logit=a&probability=b",
    "/v1/audits/some-job/view",
)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_root):
    settings = Settings(redis_url=None, data_dir=tmp_path_factory.mktemp("pages"), model_dirs=[tiny_model_root])
    return create_app(settings).test_client()


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for part in policy.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


@pytest.mark.parametrize("path", PAGES)
def test_every_page_has_the_strict_policy_and_no_inline_script_or_style(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    policy = directives(response.headers["Content-Security-Policy"])
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in value or value == "*" for values in policy.values() for value in values)
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    html = response.get_data(as_text=True)
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts, "a page without its script"
    assert all(re.search(r'\bsrc="/static/[a-z]+\.js\?v=[0-9a-f]{16}"', tag) for tag in scripts), scripts
    assert "/static/api.js?" in scripts[0], "api.js (the API key) must load before the page's own script"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    assert "http://" not in html  # nothing from another origin
    assert "https://" not in html
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert served.headers["Cache-Control"] == "public, max-age=31536000, immutable", asset


def test_every_static_file_is_served_under_its_content_digest(client):
    """One route serves every page's files; the digest in the name follows the content."""
    for path in sorted((REPO / "service" / "static").iterdir()):
        url = static_url(path.name)
        assert url == f"/static/{path.name}?v={hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.get_data() == path.read_bytes(), url
        assert response.mimetype == MEDIA_TYPES[path.suffix], url
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_ui_lists_every_bundled_sample_and_serves_it(client):
    html = client.get("/ui").get_data(as_text=True)
    files = sorted(path.name for path in SAMPLES.glob("*.png"))
    assert sorted(re.findall(r'<option value="([^"]+\.png)">', html)) == files
    response = client.get(f"/ui/samples/{files[0]}")
    assert response.status_code == 200
    assert response.get_data() == (SAMPLES / files[0]).read_bytes()
    missing = client.get("/ui/samples/labels.csv")
    assert missing.status_code == 404
    assert missing.get_json()["problem"] == "unknown_sample"


def test_the_static_files_and_templates_are_package_data():
    """A non-editable install has them: each file matches a package-data pattern of pyproject.toml."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    service = REPO / "service"
    files = [path for folder in ("static", "templates") for path in (service / folder).iterdir()]
    assert len(files) >= 6
    for path in files:
        relative = Path(path).relative_to(service).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_the_input_picture_of_an_unknown_job_is_a_404_problem(client):
    response = client.get("/v1/explanations/no-such-job/input.png")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert "Content-Security-Policy" not in response.headers  # an API route, not a page
