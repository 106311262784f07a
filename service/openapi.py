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
a client's usual parameters with a new image, is checked once. A JSON body's ``image`` string
is the exception that would defeat that (every image is new): it is checked on its own against
its schema on every request (:class:`ImageFields`), and a body whose image passes is remembered
by the rest of the body only, so its verdict is reused whatever the image. The memo is bounded twice:
at most :data:`MEMO_MAX_ENTRIES` verdicts and :data:`MEMO_MAX_BYTES` of them. Its keys are
digests of the shape (a 1 MB form field is not kept as a key), and each verdict's messages
are cut to :data:`MAX_DETAIL_CHARS` (jsonschema quotes the offending value whole, so a
refused 1 MB array made a 1 MB message), so refused bodies cannot grow the API's memory.

Before any of this, :func:`service.limits.check_request` bounds the body's nesting depth,
its arrays and repeated form parts, so that even a request whose shape is new costs little.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import yaml
from flask import Request, current_app
from flask import request as current_request
from jsonschema_path import SchemaPath
from openapi_core import Config, OpenAPI
from openapi_core.contrib.flask import FlaskOpenAPIRequest
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.exceptions import MediaTypeDeserializeError
from openapi_core.security.factories import SecurityProviderFactory
from openapi_core.security.providers import BaseProvider
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.exceptions import PathError
from openapi_core.validation.request.exceptions import (
    MissingRequestBodyError,
    ParameterValidationError,
    RequestBodyValidationError,
)
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from openapi_schema_validator import OAS30ReadValidator, OAS31Validator
from werkzeug.datastructures import MultiDict

from classlens.core.settings import Settings
from service.errors import Problem
from service.limits import check_request

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
MULTIPART = "multipart/form-data"
MEMO_MAX_ENTRIES = 4096
MEMO_MAX_BYTES = 4 * 1024 * 1024
MAX_ERRORS = 20  # messages listed per verdict: enough to fix a request, not one per item of a huge array
MAX_DETAIL_CHARS = 500  # per validation message; the full value the client sent is theirs already


# What a file part stands for in a multipart body's validation: the same text for every file.
FILE_PART = "(file)"


def _parsed_form(value: bytes, **parameters: str) -> MultiDict[str, Any]:
    """The current request's form fields as Werkzeug parsed them; a file part stands for itself by a text.

    The schema can only say that a file is there (``format: binary``); its bytes are checked by
    ``decode_image``, so they are neither copied nor handed to the JSON Schema validator. Neither
    its bytes nor its name change the verdict, so a new image (or a new file name) reuses it.
    """
    fields: MultiDict[str, Any] = MultiDict(current_request.form.items(multi=True))
    for name, _ in current_request.files.items(multi=True):
        fields.add(name, FILE_PART)
    return fields


def _json_loads(value: bytes, **parameters: str) -> Any:
    """problem+json is JSON (for validating responses in tests)."""
    return json.loads(value)


class _AnyCredentials(BaseProvider):
    def __call__(self, parameters: RequestParameters) -> Any:
        return None


class _SecurityLeftToAuth(SecurityProviderFactory):
    """The contract's ``security`` is enforced by :mod:`service.auth` before validation, not here.

    openapi-core would refuse a request without an ``Authorization`` header, and then stop without
    looking at its parameters or body: with authentication off (the embedded default) every request
    would fail, and with it on a request only gets here once its key has been checked (401/403 first).
    So every scheme accepts whatever it is given, and a verdict still depends on no header.
    """

    def create(self, scheme: SchemaPath) -> Any:
        return _AnyCredentials(scheme)


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
                message = _cut(getattr(schema_error, "message", str(schema_error)))
                yield f"{path}: {message}" if path else message
        else:
            yield _cut(str(error))


def _cut(message: str) -> str:
    if len(message) <= MAX_DETAIL_CHARS:
        return message
    return f"{message[:MAX_DETAIL_CHARS]}... ({len(message):,} characters in all)"


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
        details = [f"{error}: {reason}" for reason in islice(_describe(causes), MAX_ERRORS)] or [_cut(str(error))]
        return Problem(400, "Invalid parameter", "; ".join(details), problem="bad_parameter", errors=details)
    if isinstance(error, RequestBodyValidationError):
        schema_errors = [cause for cause in causes if isinstance(cause, InvalidSchemaValue)]
        if schema_errors:
            details = list(islice(_describe(schema_errors), MAX_ERRORS))
            return Problem(422, "Invalid request body", "; ".join(details), problem="invalid_body", errors=details)
        deserialize = next((cause for cause in causes if isinstance(cause, MediaTypeDeserializeError)), None)
        what = f"not valid {deserialize.mimetype}" if deserialize is not None else "malformed"
        return Problem(400, "Malformed request body", f"the request body is {what}", problem="malformed_body")
    return Problem(400, "Invalid request", _cut(str(error)), problem="invalid_request")


def _size(problem: Problem | None) -> int:
    """Roughly the bytes a memoised verdict holds (its texts, plus a fixed overhead per entry)."""
    if problem is None:
        return 200
    texts = [problem.title, problem.detail, problem.problem, *(repr(value) for value in problem.extra.values())]
    return 400 + sum(len(text) for text in texts)


class VerdictMemo:
    """A least-recently-used memo of verdicts, bounded by entries and by bytes; safe across threads."""

    def __init__(self, max_entries: int = MEMO_MAX_ENTRIES, max_bytes: int = MEMO_MAX_BYTES):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[bytes, tuple[Problem | None, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def size_bytes(self) -> int:
        """The bytes its verdicts and keys hold, as :func:`_size` counts them."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> tuple[bool, Problem | None]:
        """``(found, verdict)``."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return False, None
            self.hits += 1
            self._entries.move_to_end(key)
            return True, found[0]

    def put(self, key: bytes, verdict: Problem | None) -> None:
        size = _size(verdict) + len(key)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (verdict, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped


IMAGE_FIELD = "image"
# A JSON body schema whose top level has only these keywords decides its ``image`` property alone
# (no oneOf, if/then, dependencies...): an image valid by its own schema cannot change the verdict.
_PLAIN_OBJECT = {"type", "required", "additionalProperties", "properties", "description", "title", "examples"}


def _local(document: dict[str, Any], schema: Any) -> Any:
    """``schema``, or what its local ``$ref`` names (one level deep: enough for a body and its fields)."""
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        found: Any = document
        for part in schema["$ref"][2:].split("/"):
            found = found[part]
        return found
    return schema


class ImageFields:
    """The one check of a JSON body's ``image`` string, on every request, against the contract's own schema for it.

    Built from ``openapi.yaml``: for each operation whose JSON body is a plain object (see
    :data:`_PLAIN_OBJECT`) with an ``image`` string property, that property's schema (type, length,
    pattern, format), checked with the validator openapi-core uses for OpenAPI 3.1. Where the image
    passes, the rest of the body alone decides the verdict, so :class:`Contract` remembers the
    verdict by the rest only; an image that fails is left to openapi-core, so the refusal is the
    same problem+json as for any body.
    """

    def __init__(self, document: dict[str, Any]):
        self._validators: dict[tuple[str, str], Any] = {}
        for path, operations in (document.get("paths") or {}).items():
            for method, operation in operations.items():
                if not isinstance(operation, dict) or "requestBody" not in operation:
                    continue
                content = _local(document, operation["requestBody"]).get("content", {})
                body = _local(document, content.get("application/json", {}).get("schema"))
                if not isinstance(body, dict) or not set(body) <= _PLAIN_OBJECT or body.get("type") != "object":
                    continue
                image = _local(document, (body.get("properties") or {}).get(IMAGE_FIELD))
                if isinstance(image, dict) and image.get("type") == "string" and "$ref" not in repr(image):
                    validator = OAS31Validator(image, format_checker=OAS30ReadValidator.FORMAT_CHECKER)
                    self._validators[(method.upper(), path)] = validator

    @property
    def operations(self) -> set[tuple[str, str]]:
        """``(METHOD, /path/{template})`` of every operation whose body has such an ``image`` field."""
        return set(self._validators)

    def rest_if_valid(self, request: Request) -> dict[str, Any] | None:
        """The JSON body without its ``image``, when the request has one and it passes its schema; else None."""
        if request.mimetype != "application/json" or request.url_rule is None:
            return None
        validator = self._validators.get((request.method, _template(request.url_rule.rule)))
        if validator is None:
            return None
        body = request.get_json(silent=True)  # parsed once: the handler reads Flask's cached copy
        if not isinstance(body, dict) or not isinstance(body.get(IMAGE_FIELD), str):
            return None
        if not validator.is_valid(body[IMAGE_FIELD]):
            return None
        return {name: value for name, value in body.items() if name != IMAGE_FIELD}


def _template(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/v1/jobs/<id>`` and ``/<int:n>`` become ``/v1/jobs/{id}`` and ``/{n}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


class Contract:
    """``openapi.yaml``: its text (served as is), its parsed form and its validator."""

    def __init__(self, path: Path = SPEC_PATH):
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.document: dict[str, Any] = yaml.safe_load(self.text)
        config = Config(
            extra_media_type_deserializers={MULTIPART: _parsed_form, "application/problem+json": _json_loads},
            security_provider_factory=_SecurityLeftToAuth(),
        )
        self.openapi = OpenAPI.from_dict(self.document, config=config)

        self.images = ImageFields(self.document)
        self.memo = VerdictMemo()

    def validate(self, request: Request) -> None:
        """Raise a :class:`Problem` unless ``request`` fits the contract (an unknown route is left to Flask).

        A body whose ``image`` passes :class:`ImageFields` is looked up by the rest of it, under which
        only acceptances are kept: a refusal may quote the body, image included, so it stays keyed by
        the exact body and is never handed to a request with another image.
        """
        if request.routing_exception is not None or request.url_rule is None:
            return
        check_request(request, _settings())
        rest = self.images.rest_if_valid(request)
        without_image = None if rest is None else _without_image_key(request, rest)
        if without_image is not None and self.memo.get(without_image) == (True, None):
            return
        key = _shape_key(request)
        found, verdict = self.memo.get(key)
        if not found:
            verdict = self._check_current_request()
            if verdict is None and without_image is not None:
                self.memo.put(without_image, None)
            else:
                self.memo.put(key, verdict)
        if verdict is not None:  # a fresh exception each time: a memoised one would collect tracebacks
            raise Problem(verdict.status, verdict.title, verdict.detail, problem=verdict.problem, **verdict.extra)

    def _check_current_request(self) -> Problem | None:
        """openapi-core's verdict on the current request."""
        result = self.openapi.unmarshal_request(_Request(current_request))
        errors = [error for error in result.errors if not isinstance(error, PathError)]
        return _problem(errors[0]) if errors else None


def _shape(request: Request) -> Hashable:
    """Everything the contract's verdict depends on: no header or cookie is declared, security is service.auth's."""
    if request.mimetype == MULTIPART:
        fields = tuple(request.form.items(multi=True))
        files = tuple(name for name, _ in request.files.items(multi=True))  # each stands for FILE_PART
        body: Hashable = (fields, files)
    else:
        body = hashlib.sha256(request.get_data(cache=True)).digest()
    return (request.method, request.path, request.query_string, request.mimetype, body)


def _shape_key(request: Request) -> bytes:
    """A digest of :func:`_shape`: the memo keeps 32 bytes per shape, however large its form fields."""
    return hashlib.sha256(repr(_shape(request)).encode()).digest()


def _without_image_key(request: Request, rest: dict[str, Any]) -> bytes:
    """A digest of :func:`_shape` with a valid ``image`` left out (``rest`` is the body without it)."""
    body = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=True)
    shape = (request.method, request.path, request.query_string, request.mimetype, f"{IMAGE_FIELD} valid", body)
    return hashlib.sha256(repr(shape).encode()).digest()


_DEFAULT_SETTINGS: list[Settings] = []


def _settings() -> Settings:
    """The current app's settings (``create_app`` keeps them), or the defaults outside such an app."""
    found = current_app.extensions.get("classlens")
    if found is not None:
        settings: Settings = found.settings
        return settings
    if not _DEFAULT_SETTINGS:
        _DEFAULT_SETTINGS.append(Settings())
    return _DEFAULT_SETTINGS[0]
