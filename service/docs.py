"""``/docs``: the whole contract, ``openapi.yaml`` itself, rendered by Swagger UI in the browser.

Swagger UI comes from the ``swagger-ui-bundle`` package and is served by the service (no CDN: the
service may have no network) through ``/static/{name}``, like every page's files, versioned by
content. The page starts it with ``service/static/docs.js`` and loads the contract from ``/openapi.yaml``.
Its Content-Security-Policy lets scripts come from the service only, none inline; without
JavaScript the page shows a plain list of every path, operation, parameter and body type.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from swagger_ui_bundle import swagger_ui_path

SWAGGER_UI = Path(str(swagger_ui_path))
# The files of the installed Swagger UI that the page loads, by the names /static/{name} serves them
# under; nothing else of the package is served (its index.html would start Swagger UI on another document).
SWAGGER_UI_FILES: dict[str, Path] = {
    "swagger-ui.css": SWAGGER_UI / "swagger-ui.css",
    "swagger-ui-bundle.js": SWAGGER_UI / "swagger-ui-bundle.js",
    "swagger-ui-favicon.png": SWAGGER_UI / "favicon-32x32.png",
}
# No 'unsafe-inline' anywhere: Swagger UI sets its styles through the DOM (not style attributes nor
# <style> elements), which style-src does not govern; tests/test_browser_pages.py checks that Chromium
# reports no violation. The page may fetch nothing but the service itself ("Try it out" calls it).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SPEC_URL = "/openapi.yaml"

_METHODS = ("get", "post", "put", "patch", "delete")


def _text(value: Any) -> str:
    return escape(str(value or ""))


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    return str(schema.get("type", "any"))


def _resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Follow one local ``$ref`` (parameters and responses are often references)."""
    ref = item.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return item
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return dict(node)


def _operation(document: dict[str, Any], path: str, method: str, operation: dict[str, Any]) -> str:
    parts = [
        f'<div class="op"><p><span class="m">{method}</span> <code>{_text(path)}</code> — '
        f"{_text(operation.get('summary'))}</p>"
    ]
    if operation.get("description"):
        parts.append(f"<p>{_text(operation['description'])}</p>")
    parameters = [_resolve(document, p) for p in operation.get("parameters", [])]
    if parameters:
        rows = "".join(
            f"<tr><td><code>{_text(p['name'])}</code></td><td>{_text(p['in'])}</td>"
            f"<td>{_schema_name(p.get('schema', {}))}</td><td>{'yes' if p.get('required') else ''}</td>"
            f"<td>{_text(p.get('description'))}</td></tr>"
            for p in parameters
        )
        parts.append(
            "<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th><th></th></tr>" + rows + "</table>"
        )
    body = operation.get("requestBody", {}).get("content", {})
    for media_type, content in body.items():
        parts.append(f"<p>Body <code>{_text(media_type)}</code>: {_text(_schema_name(content.get('schema', {})))}</p>")
    responses = operation.get("responses", {})
    items = "".join(
        f"<li><code>{_text(status)}</code> {_text(_resolve(document, response).get('description'))}</li>"
        for status, response in responses.items()
    )
    parts.append(f"<ul>{items}</ul></div>")
    return "".join(parts)


def _fallback(document: dict[str, Any]) -> str:
    """The contract as plain HTML: what a reader without JavaScript sees."""
    info = document.get("info", {})
    sections = [
        f"<h1>{_text(info.get('title'))} <small>{_text(info.get('version'))}</small></h1>",
        f"<p>{_text(info.get('description'))}</p>",
        f'<p>The machine-readable contract: <a href="{SPEC_URL}"><code>{SPEC_URL}</code></a> (OpenAPI 3.1).</p>',
    ]
    for path, item in document.get("paths", {}).items():
        sections.append(f"<h2><code>{_text(path)}</code></h2>")
        sections.extend(_operation(document, path, m, item[m]) for m in _METHODS if m in item)
    return "\n".join(sections)


def render_docs(document: dict[str, Any], asset_url: Callable[[str], str]) -> str:
    """The page: Swagger UI's stylesheet and script, the start script, and the fallback inside ``<noscript>``.

    ``asset_url`` names a static file (:func:`service.routes.pages.static_url`).
    """
    title = _text(document.get("info", {}).get("title"))
    return "\n".join(
        [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title} API</title>",
            f'<link rel="stylesheet" href="{asset_url("swagger-ui.css")}">',
            f'<link rel="stylesheet" href="{asset_url("docs.css")}">',
            f'<link rel="icon" type="image/png" href="{asset_url("swagger-ui-favicon.png")}">',
            "</head><body>",
            f'<div id="swagger-ui" data-spec="{SPEC_URL}"></div>',
            f'<noscript><div class="fallback">{_fallback(document)}</div></noscript>',
            f'<script src="{asset_url("swagger-ui-bundle.js")}"></script>',
            f'<script src="{asset_url("docs.js")}"></script>',
            "</body></html>",
        ]
    )
