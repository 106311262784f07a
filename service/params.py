"""From an HTTP request to an image and a *canonical* :class:`~classlens.core.contract.ExplainRequest`.

Both body forms (JSON with a base64 image, multipart with a file) end in the same
:class:`ExplainInput`. :func:`canonical_request` then checks the parameters against the
model's manifest (torch-free) and rewrites them so that requests meaning the same thing
are equal, and therefore share one content key, one cached result and one computation:
label names become class indices, layers are sorted and de-duplicated, the default layer
is made explicit, and ``top_k`` is neutral when explicit targets make it irrelevant.
The worker checks everything again with the lens itself.
"""

from __future__ import annotations

import base64
import binascii
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from werkzeug.datastructures import FileStorage, MultiDict

from classlens.core.capabilities import Need, describe_missing, missing
from classlens.core.contract import ExplainRequest
from model_store.manifest import Manifest
from service.errors import Problem
from service.model_info import ModelInfo, model_info

_DEFAULT_TOP_K = ExplainRequest.model_fields["top_k"].default
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class ExplainInput:
    """One image, the model reference and the parameters as the client sent them."""

    image: bytes
    model: str
    fields: dict[str, Any] = field(default_factory=dict)


def _bad(detail: str, problem: str = "bad_parameter", title: str = "Invalid parameter") -> Problem:
    return Problem(422, title, detail, problem=problem)


def from_json(body: Mapping[str, Any]) -> ExplainInput:
    """A validated JSON body (see ``ExplainJsonRequest``) with its base64 image decoded."""
    try:
        image = base64.b64decode(body["image"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise _bad(f"image is not valid base64: {error}", "invalid_base64", "Invalid base64") from error
    fields = {key: value for key, value in body.items() if key not in {"image", "model"}}
    return ExplainInput(image=image, model=body["model"], fields=fields)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def is_index(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts ``²`` or ``٣``, which are label names here, not indices."""
    return text.isascii() and text.isdigit()


def from_form(form: MultiDict[str, str], files: MultiDict[str, FileStorage]) -> ExplainInput:
    """A validated multipart body (see ``ExplainFormRequest``): text fields parsed, the file read."""
    upload = files.get("image")
    if upload is None:
        raise Problem(400, "Missing image", "send the image as a file part named 'image'", problem="missing_image")
    return ExplainInput(image=upload.read(), model=form["model"], fields=form_fields(form))


def form_fields(form: MultiDict[str, str]) -> dict[str, Any]:
    """The explain parameters among validated form fields, parsed (lists are comma-separated)."""
    fields: dict[str, Any] = {}
    if "targets" in form:
        fields["targets"] = [int(part) if is_index(part) else part for part in _split(form["targets"])]
    if "top_k" in form:
        fields["top_k"] = int(form["top_k"])
    if "layers" in form:
        layers = form["layers"].strip()
        fields["layers"] = "all" if layers == "all" else [int(part) for part in _split(layers)]
    for name in ("map_kind", "norm"):
        if name in form:
            fields[name] = form[name]
    for name in ("sublayers", "gradient_map", "bias"):
        if name in form:
            fields[name] = _BOOLEANS[form[name].strip().lower()]
    return fields


def resolve_targets(targets: Sequence[int | str], labels: Sequence[str]) -> list[int]:
    """Class indices from indices or label names (case-insensitive); a 422 naming the first bad one."""
    if len(targets) > len(labels):
        raise _bad(
            f"{len(targets):,} targets for a model of {len(labels)} classes: name each class at most once",
            "too_many_targets",
            "Too many targets",
        )
    by_name = {label.casefold(): index for index, label in enumerate(labels)}
    resolved: list[int] = []
    for target in targets:
        if isinstance(target, int):
            if not 0 <= target < len(labels):
                raise _bad(
                    f"class index {target} is out of range: the model has classes 0..{len(labels) - 1}",
                    "unknown_class",
                    "Unknown class",
                )
            resolved.append(target)
            continue
        index = by_name.get(target.strip().casefold())
        if index is None:
            close = difflib.get_close_matches(target, labels, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise _bad(f"unknown class {target!r}{hint}", "unknown_class", "Unknown class")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise _bad("targets repeat a class")
    return resolved


def _layers(value: Any, info: ModelInfo) -> list[int] | None:
    if value is None:
        return [info.layers] if info.layers is not None else None
    if value == "all":
        if info.layers is None:
            raise _bad("this model's manifest does not give its depth: list the layers instead of 'all'")
        return list(range(info.layers + 1))
    layers = sorted(set(value))
    if info.layers is not None:
        bad = [layer for layer in layers if layer > info.layers]
        if bad:
            raise _bad(f"layer {bad[0]} is out of range: layers are 0 (embedding) to {info.layers} (last block)")
    return layers


def canonical_request(fields: Mapping[str, Any], labels: Sequence[str], info: ModelInfo) -> ExplainRequest:
    """The parameters checked against the model and rewritten into their canonical form."""
    values = dict(fields)
    targets = values.pop("targets", None)
    if targets:
        values["targets"] = resolve_targets(targets, labels)
        values["top_k"] = _DEFAULT_TOP_K
    else:
        values["top_k"] = min(int(values.get("top_k", _DEFAULT_TOP_K)), len(labels))
    values["layers"] = _layers(values.get("layers"), info)
    try:
        return ExplainRequest.model_validate(values)
    except ValidationError as error:
        raise invalid_parameters(error) from error


def require(manifest: Manifest, reference: str, needs: frozenset[Need], what: str) -> None:
    """A 422 ``unsupported_model`` unless the manifest meets ``needs`` (see :mod:`classlens.core.capabilities`).

    Refused here, before anything is stored or queued, rather than accepted and failed by a worker:
    the manifest already tells what the model is.
    """
    info = model_info(manifest)
    lacking = missing(needs, is_vit=info.grid is not None, prefix_tokens=info.prefix_tokens or ())
    if lacking:
        raise Problem(
            422, "Model cannot do this", describe_missing(what, reference, lacking), problem="unsupported_model"
        )


def invalid_parameters(error: ValidationError) -> Problem:
    """A 422 listing every parameter a request model (explain, analysis) refused, and why."""
    details = [f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()]
    return Problem(422, "Invalid parameter", "; ".join(details), problem="bad_parameter", errors=details)
