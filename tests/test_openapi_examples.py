"""The examples of openapi.yaml: one for every operation, each valid against its own schema, and real.

Swagger UI at ``/docs`` shows them beside each operation, so a wrong one teaches a wrong request.
Each example is validated with jsonschema (JSON Schema 2020-12, the dialect of OpenAPI 3.1)
against the schema of the media type or parameter it belongs to, and the JSON request examples
are sent to the real app, which must accept them (a model it has, an image that decodes).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from PIL import Image

from classlens.core.settings import Settings
from service.app import create_app
from tests.service_fixtures import resolve_ref

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = yaml.safe_load((REPO / "openapi.yaml").read_text(encoding="utf-8"))
METHODS = ("get", "post", "put", "patch", "delete")
# Bodies that are files or pages, not data to show: no example is expected of them.
NO_EXAMPLE = {"image/png", "image/*", "text/html", "application/yaml", "text/javascript", "text/css"}


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    return resolve_ref(DOCUMENT, node)


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, item[method]) for path, item in DOCUMENT["paths"].items() for method in METHODS if method in item
    ]


def media_types() -> list[tuple[str, str, dict[str, Any]]]:
    """Every (where, media type, media type object) of the document: request bodies and responses."""
    found = []
    for path, method, operation in operations():
        where = f"{method.upper()} {path}"
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            found.append((f"{where} request", media, content))
        for status, response in operation.get("responses", {}).items():
            for media, content in resolve(response).get("content", {}).items():
                found.append((f"{where} {status}", media, content))
    return found


def examples_of(content: dict[str, Any]) -> list[Any]:
    values = [resolve(example)["value"] for example in content.get("examples", {}).values()]
    return values + ([content["example"]] if "example" in content else [])


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` references resolve in the document."""
    return Draft202012Validator({**schema, "components": DOCUMENT["components"]}, format_checker=FormatChecker())


OPERATION_IDS = [operation["operationId"] for _, _, operation in operations()]


@pytest.mark.parametrize(("path", "method", "operation"), operations(), ids=OPERATION_IDS)
def test_every_operation_has_examples_of_its_parameters_body_and_responses(path, method, operation):
    missing = []
    for parameter in map(resolve, operation.get("parameters", [])):
        if parameter["in"] == "path" and "example" not in parameter:
            missing.append(f"path parameter {parameter['name']}")
    for media, content in operation.get("requestBody", {}).get("content", {}).items():
        if not examples_of(content):
            missing.append(f"request {media}")
    shown = 0
    for status, response in operation["responses"].items():
        for media, content in resolve(response).get("content", {}).items():
            if media in NO_EXAMPLE:
                continue
            if not examples_of(content):
                missing.append(f"response {status} {media}")
            shown += 1
    assert not missing, missing
    # A page or file route still documents its request (a parameter example) or its answer.
    assert (
        shown
        or any("example" in resolve(p) for p in operation.get("parameters", []))
        or path
        in {
            "/openapi.yaml",
            "/docs",
            "/ui",
        }
    )


@pytest.mark.parametrize(("where", "media", "content"), media_types(), ids=[f"{w} {m}" for w, m, _ in media_types()])
def test_every_example_validates_against_its_schema(where, media, content):
    check = validator(content.get("schema", {}))
    for value in examples_of(content):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in check.iter_errors(value)]
        assert not errors, errors


def test_every_parameter_example_validates_against_its_schema():
    checked = 0
    for _, _, operation in operations():
        for parameter in map(resolve, operation.get("parameters", [])):
            if "example" in parameter:
                assert validator(parameter["schema"]).is_valid(parameter["example"]), parameter
                checked += 1
    assert checked >= 5


def test_there_are_servers_and_the_first_is_this_service():
    assert DOCUMENT["servers"][0]["url"] == "/"
    assert all(server["url"].startswith(("/", "http://", "https://")) for server in DOCUMENT["servers"])


def test_the_examples_name_the_bundled_model_and_carry_a_sample_image():
    request = resolve(DOCUMENT["components"]["examples"]["ExplainRequest"])["value"]
    assert request["model"] == "fmnist-vit"
    image = Image.open(io.BytesIO(base64.b64decode(request["image"], validate=True)))
    assert image.size == (28, 28)
    succeeded = resolve(DOCUMENT["components"]["examples"]["ExplanationSucceeded"])["value"]
    assert succeeded["model"].startswith("fmnist-vit@")
    assert succeeded["result"]["targets"][0]["label"] == succeeded["result"]["prediction"][0]["label"]


@pytest.mark.parametrize(
    ("path", "example"),
    [("/v1/explanations", "ExplainRequest"), ("/v1/audits", "AuditRequest"), ("/v1/analyses", "AnalysisRequest")],
)
def test_the_json_request_examples_are_accepted_by_the_service(tmp_path, path, example):
    """Sent as they are to the real app (no worker: an accepted job stays queued)."""
    app = create_app(Settings(redis_url=None, data_dir=tmp_path / "data", max_wait_s=0))
    body = resolve(DOCUMENT["components"]["examples"][example])["value"]
    response = app.test_client().post(path, json=body)
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["status"] == "queued"
    assert job["model"].startswith(f"{body['model']}@")
