"""The hand-written ``openapi.yaml``, loaded once per app and enforced on every request.

Requests are validated with openapi-core before a handler runs, so a handler only ever
sees what the contract allows, and a request the contract refuses gets a problem+json
listing every violation (400 for parameters and malformed bodies, 415 for an unknown body
type, 422 for a well-formed body that breaks the schema).

Multipart bodies are parsed once, by Werkzeug: openapi-core is given the parsed form
instead of re-parsing the raw bytes itself (see :func:`_parsed_form`).

openapi-core walks the document (resolving ``$ref`` after ``$ref``) on every call, which
costs several milliseconds a request, most of a cache hit. A verdict depends only on what
it reads (method, path, query, media type and body, with file parts standing for
themselves), so verdicts are memoised on exactly that: a repeated request shape, such as
a client's usual parameters with a new image, is checked once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from flask import Request
from flask import request as current_request
from openapi_core import Config, OpenAPI
from openapi_core.contrib.flask import FlaskOpenAPIRequest
from openapi_core.deserializing.media_types.exceptions import MediaTypeDeserializeError
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.exceptions import PathError
from openapi_core.validation.request.exceptions import (
    MissingRequestBodyError,
    ParameterValidationError,
    RequestBodyValidationError,
)
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from werkzeug.datastructures import MultiDict

from service.errors import Problem

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
MULTIPART = "multipart/form-data"


def _parsed_form(value: bytes, **parameters: str) -> MultiDict[str, Any]:
    """The current request's form fields as Werkzeug parsed them; a file part stands for itself by a text.

    The schema can only say that a file is there (``format: binary``); its bytes are checked by
    ``decode_image``, so they are neither copied nor handed to the JSON Schema validator.
    """
    fields: MultiDict[str, Any] = MultiDict(current_request.form.items(multi=True))
    for name, upload in current_request.files.items(multi=True):
        fields.add(name, f"(file {upload.filename or ''})")
    return fields


def _json_loads(value: bytes, **parameters: str) -> Any:
    """problem+json is JSON (for validating responses in tests)."""
    return json.loads(value)


class _Request(FlaskOpenAPIRequest):
    """A Flask request for openapi-core that does not hand over multipart bytes (they are parsed already)."""

    @property
    def body(self) -> bytes | None:
        if self.request.mimetype == MULTIPART:
            # Not empty (that would read as "no body"); _parsed_form ignores it and reads the parsed form.
            return b"(multipart: parsed by werkzeug)"
        return self.request.get_data(cache=True)


def _describe(errors: Iterable[BaseException]) -> Iterator[str]:
    for error in errors:
        if isinstance(error, InvalidSchemaValue):
            for schema_error in error.schema_errors:
                path = "/".join(str(part) for part in getattr(schema_error, "absolute_path", []))
                message = getattr(schema_error, "message", str(schema_error))
                yield f"{path}: {message}" if path else message
        else:
            yield str(error)


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error.__cause__ is not None:
        error = error.__cause__
        chain.append(error)
    return chain


def _problem(error: BaseException) -> Problem:
    causes = _causes(error)
    if isinstance(error, MediaTypeNotFound) or any(isinstance(cause, MediaTypeNotFound) for cause in causes):
        return Problem(
            415,
            "Unsupported media type",
            "send the body as application/json or multipart/form-data",
            problem="unsupported_media_type",
        )
    if isinstance(error, MissingRequestBodyError):
        return Problem(400, "Missing body", "this operation needs a request body", problem="missing_body")
    if isinstance(error, ParameterValidationError):
        details = [f"{error}: {reason}" for reason in _describe(causes)] or [str(error)]
        return Problem(400, "Invalid parameter", "; ".join(details), problem="bad_parameter", errors=details)
    if isinstance(error, RequestBodyValidationError):
        schema_errors = [cause for cause in causes if isinstance(cause, InvalidSchemaValue)]
        if schema_errors:
            details = list(_describe(schema_errors))
            return Problem(422, "Invalid request body", "; ".join(details), problem="invalid_body", errors=details)
        deserialize = next((cause for cause in causes if isinstance(cause, MediaTypeDeserializeError)), None)
        what = f"not valid {deserialize.mimetype}" if deserialize is not None else "malformed"
        return Problem(400, "Malformed request body", f"the request body is {what}", problem="malformed_body")
    return Problem(400, "Invalid request", str(error), problem="invalid_request")


class Contract:
    """``openapi.yaml``: its text (served as is), its parsed form and its validator."""

    def __init__(self, path: Path = SPEC_PATH):
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.document: dict[str, Any] = yaml.safe_load(self.text)
        config = Config(
            extra_media_type_deserializers={MULTIPART: _parsed_form, "application/problem+json": _json_loads}
        )
        self.openapi = OpenAPI.from_dict(self.document, config=config)

        self._verdict = lru_cache(maxsize=4096)(self._check_current_request)

    def validate(self, request: Request) -> None:
        """Raise a :class:`Problem` unless ``request`` fits the contract (an unknown route is left to Flask)."""
        if request.routing_exception is not None or request.url_rule is None:
            return
        verdict = self._verdict(_shape(request))
        if verdict is not None:  # a fresh exception each time: a memoised one would collect tracebacks
            raise Problem(verdict.status, verdict.title, verdict.detail, problem=verdict.problem, **verdict.extra)

    def _check_current_request(self, shape: Hashable) -> Problem | None:
        """openapi-core's verdict on the current request (``shape`` is only the memo key)."""
        result = self.openapi.unmarshal_request(_Request(current_request))
        errors = [error for error in result.errors if not isinstance(error, PathError)]
        return _problem(errors[0]) if errors else None


def _shape(request: Request) -> Hashable:
    """Everything the contract's verdict depends on: no header, cookie or security scheme is declared."""
    if request.mimetype == MULTIPART:
        fields = tuple(request.form.items(multi=True))
        files = tuple((name, upload.filename) for name, upload in request.files.items(multi=True))
        body: Hashable = (fields, files)
    else:
        body = hashlib.sha256(request.get_data(cache=True)).digest()
    return (request.method, request.path, request.query_string, request.mimetype, body)
