"""``/docs``: the contract as a plain HTML page for people, built from ``openapi.yaml`` itself.

No JavaScript and no assets from a CDN (the service may have no network): every path,
operation, parameter, body type and response, with their descriptions, escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

_METHODS = ("get", "post", "put", "patch", "delete")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "h2{margin-top:2rem;border-bottom:1px solid #ccc}code{background:#f3f3f3;padding:0 .2rem}"
    ".op{margin:1rem 0;padding:.5rem 1rem;border-left:4px solid #36c}.m{font-weight:bold;text-transform:uppercase}"
    "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}"
)


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


def render_docs(document: dict[str, Any]) -> str:
    info = document.get("info", {})
    title = _text(info.get("title"))
    sections = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title} API</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title} <small>{_text(info.get('version'))}</small></h1>",
        f"<p>{_text(info.get('description'))}</p>",
        '<p>The machine-readable contract: <a href="/openapi.yaml"><code>/openapi.yaml</code></a> (OpenAPI 3.1).</p>',
    ]
    for path, item in document.get("paths", {}).items():
        sections.append(f"<h2><code>{_text(path)}</code></h2>")
        sections.extend(_operation(document, path, m, item[m]) for m in _METHODS if m in item)
    sections.append("</body></html>")
    return "\n".join(sections)
