"""Bounds checked before openapi-core (or any handler) looks at a request body, so every refusal is cheap.

openapi-core and jsonschema walk a body item by item, recursively: a JSON array of a million
targets cost tens of seconds of API CPU before its 422, and JSON nested 100,000 deep ran out of
Python's stack (a 500). The checks here run first, on the raw request, and each costs at most
one ``json.loads`` (C code, which refuses deep nesting with ``RecursionError`` after about a
thousand levels instead of overflowing) and a walk that stops at the first array over its cap:

- the JSON body's nesting depth is at most :data:`MAX_JSON_DEPTH`;
- no JSON array (or object) holds more than :func:`max_array_items` items (the most images a
  batch route accepts; the contract's ``maxItems`` then bounds each field more tightly);
- ``NaN`` and ``Infinity``, which Python's parser accepts but JSON does not, are malformed, and
  so is a number too large for a float (``1e400``, which Python would read as infinity);
- a multipart form names each field and file part once, except the parts meant to repeat
  (``images`` and ``labels`` of audits and analyses): a second ``image`` or ``model`` was
  silently ignored before, so the client never learnt that half its request was dropped.

JSON numbers are then read by value (:func:`integral_numbers`): ``2.0`` is the integer 2, as
JSON Schema says, so handlers never meet a float where the contract allows an integer.
"""

from __future__ import annotations

import json
import math
from typing import Any

from flask import Request

from classlens.core.settings import Settings
from service.errors import Problem

MAX_JSON_DEPTH = 32  # the deepest body the contract describes is 4 levels (images -> item -> label)
MULTIPART = "multipart/form-data"
# Form parts that a route reads as a list; every other part must appear at most once.
REPEATABLE_PARTS: dict[str, frozenset[str]] = {
    "audits.create_audit": frozenset({"images", "labels"}),
    "analyses.create_analysis": frozenset({"images", "labels"}),
}


def max_array_items(settings: Settings) -> int:
    """The longest JSON array any route accepts: a batch route's images (other arrays have smaller caps)."""
    return max(settings.audit_max_images, settings.analysis_max_images)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent; one beyond a float's range (``1e400``) is not read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a JSON number a float can hold")
    return value


class _TooDeep(Exception):
    pass


class _TooLong(Exception):
    def __init__(self, path: str, length: int):
        super().__init__(path)
        self.path, self.length = path, length


def _walk(value: Any, depth: int, path: str, max_items: int) -> None:
    """Raise at the first container deeper than allowed or array longer than allowed (checked before its items)."""
    if depth > MAX_JSON_DEPTH:
        raise _TooDeep
    if isinstance(value, list):
        if len(value) > max_items:
            raise _TooLong(path or "/", len(value))
        for position, item in enumerate(value):
            if isinstance(item, (list, dict)):
                _walk(item, depth + 1, f"{path}/{position}", max_items)
    elif isinstance(value, dict):
        if len(value) > max_items:
            raise _TooLong(path or "/", len(value))
        for key, item in value.items():
            if isinstance(item, (list, dict)):
                _walk(item, depth + 1, f"{path}/{key}", max_items)


def _too_deep() -> Problem:
    return Problem(
        422,
        "Body nested too deeply",
        f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep; no request of this API needs that",
        problem="too_deep",
    )


def check_json(data: bytes, max_items: int) -> None:
    """Refuse a JSON body that is too deep, holds too long an array, or uses NaN/Infinity; leave the rest alone.

    A body that is not JSON at all is left to the contract, which answers its usual 400.
    """
    try:
        body = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError as error:
        raise _too_deep() from error
    except ValueError as error:
        if "is not a JSON number" in str(error):
            raise Problem(
                400, "Malformed request body", f"the request body is not valid JSON: {error}", problem="malformed_body"
            ) from error
        return  # not JSON (or not UTF-8): openapi-core says so in its own words
    try:
        _walk(body, 1, "", max_items)
    except _TooDeep:
        raise _too_deep() from None
    except _TooLong as error:
        raise Problem(
            422,
            "Array too long",
            f"{error.path}: {error.length:,} items; no array of this API accepts more than {max_items:,}",
            problem="too_many_items",
        ) from None


def check_form(request: Request) -> None:
    """Refuse a multipart form that repeats a field or file part the route reads only once."""
    repeatable = REPEATABLE_PARTS.get(request.endpoint or "", frozenset())
    for parts, kind in ((request.form, "field"), (request.files, "file part")):
        for name in parts:
            if not name:  # a part without a name in its Content-Disposition: nothing can read it
                raise Problem(
                    422,
                    "Unnamed form part",
                    f"a {kind} has no name; name every part (Content-Disposition: form-data; name=...)",
                    problem="unnamed_part",
                )
            if name not in repeatable and len(parts.getlist(name)) > 1:
                raise Problem(
                    422,
                    "Repeated form part",
                    f"the {kind} {name!r} was sent {len(parts.getlist(name))} times; send it once",
                    problem="repeated_field",
                    field=name,
                )


def check_request(request: Request, settings: Settings) -> None:
    """Every bound of this module on ``request``, before the contract's validator runs."""
    if request.method not in {"POST", "PUT", "PATCH"}:
        return
    if request.mimetype == "application/json":
        check_json(request.get_data(cache=True), max_array_items(settings))
    elif request.mimetype == MULTIPART:
        check_form(request)


def integral_numbers(value: Any) -> Any:
    """``value`` with every integral float made an int: JSON (and JSON Schema) read ``2.0`` as the integer 2.

    A float that is not integral stays a float (the contract refuses it where an integer is due,
    and ``ridge`` is one). A huge integral float such as ``1e300`` becomes a huge int, which the
    handlers' range checks then refuse with a 422 naming the range.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: integral_numbers(item) for key, item in value.items()}
    return value
