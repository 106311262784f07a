"""From an HTTP request to an image and a *canonical* :class:`~classlens.core.contract.ExplainRequest`.

Both body forms (JSON with a base64 image, multipart with a file) end in the same
:class:`ExplainInput`. :func:`canonical_request` then checks the parameters against the
model's manifest (torch-free) and rewrites them so that requests meaning the same thing
are equal, and therefore share one content key, one cached result and one computation.
The rules themselves are :mod:`classlens.core.requests`, which the worker and the command
line follow too; the worker checks everything again with the lens itself.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from werkzeug.datastructures import FileStorage, MultiDict

from classlens.core import requests as rules
from classlens.core.capabilities import Need, describe_missing, missing
from classlens.core.contract import ExplainRequest
from classlens.core.requests import RequestError, parse_class
from classlens.core.requests import invalid_parameters as invalid_parameters  # the routes' one way to say it
from model_store.manifest import Manifest
from service.errors import Problem
from service.model_info import ModelInfo, model_info

_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class ExplainInput:
    """One image, the model reference and the parameters as the client sent them."""

    image: bytes
    model: str
    fields: dict[str, Any] = field(default_factory=dict)


def from_json(body: Mapping[str, Any]) -> ExplainInput:
    """A validated JSON body (see ``ExplainJsonRequest``) with its base64 image decoded."""
    try:
        image = base64.b64decode(body["image"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError("invalid_base64", f"image is not valid base64: {error}", "Invalid base64") from error
    fields = {key: value for key, value in body.items() if key not in {"image", "model"}}
    return ExplainInput(image=image, model=body["model"], fields=fields)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
        fields["targets"] = [parse_class(part) for part in _split(form["targets"])]
    for name in ("top_k", "token_classes"):
        if name in form:
            fields[name] = int(form[name])
    if "layers" in form:
        layers = form["layers"].strip()
        fields["layers"] = "all" if layers == "all" else [int(part) for part in _split(layers)]
    if "baseline_maps" in form:
        fields["baseline_maps"] = _split(form["baseline_maps"])
    for name in ("map_kind", "norm"):
        if name in form:
            fields[name] = form[name]
    for name in ("sublayers", "gradient_map", "bias"):
        if name in form:
            fields[name] = _BOOLEANS[form[name].strip().lower()]
    return fields


def canonical_request(fields: Mapping[str, Any], labels: Sequence[str], info: ModelInfo) -> ExplainRequest:
    """The parameters in canonical form (:func:`classlens.core.requests.canonical_request`), at the manifest's depth."""
    return rules.canonical_request(fields, labels, info.layers)


def require(manifest: Manifest, reference: str, needs: frozenset[Need], what: str) -> None:
    """Refused as ``unsupported_model`` unless the manifest meets ``needs`` (see :mod:`classlens.core.capabilities`).

    Refused here, before anything is stored or queued, rather than accepted and failed by a worker:
    the manifest already tells what the model is.
    """
    info = model_info(manifest)
    lacking = missing(needs, is_vit=info.grid is not None, prefix_tokens=info.prefix_tokens or ())
    if lacking:
        raise RequestError("unsupported_model", describe_missing(what, reference, lacking), "Model cannot do this")
