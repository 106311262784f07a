"""KServe's V1 explain verb, ``POST /v1/models/{name}:explain``: ClassLens as the explainer of an InferenceService.

KServe sends an explainer the V1 body ``{"instances": [...]}``; here each instance is one image in
base64, as a string or as ``{"b64": "..."}`` (the TensorFlow Serving convention for binary data), and
an optional ``parameters`` object holds the explain parameters of ``POST /v1/explanations`` for all
of them. Each instance becomes exactly the JSON body ``POST /v1/explanations`` would get
(``{"image": ..., "model": name, **parameters}``), checked against the same schema, read by the
same :func:`service.params.from_json` and checked and queued by the same
:func:`service.routes.explanations.check_explanation` and ``submit_explanation``: every instance is
checked before any is queued.

KServe's clients wait for the answer, so the route waits for the jobs, up to ``?wait=`` seconds
(default and cap ``CLASSLENS_MAX_WAIT_S``), and answers 200 ``{"predictions": [...],
"explanations": [...]}`` once every job has finished, or 202 with the jobs as they are then, each
with its own link to poll (docs/kserve.md).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from jsonschema_path import SchemaPath
from openapi_core.validation.schemas import oas31_schema_validators_factory
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from openapi_core.validation.schemas.validators import SchemaValidator

from classlens.core.contract import TERMINAL_STATUSES
from classlens.core.images import ImageError
from classlens.core.requests import RequestError
from service.app import Services, services
from service.auth import EXPLAIN, requires_scope
from service.errors import Problem, problem_for
from service.job_responses import stored_result
from service.limits import integral_numbers
from service.openapi import Contract
from service.params import ExplainInput, from_json
from service.routes.explanations import CheckedExplanation, check_explanation, submit_explanation
from service.views import job_view

blueprint = Blueprint("kserve", __name__)

MAX_ERRORS = 5


@functools.lru_cache(maxsize=4)
def body_validator(contract: Contract) -> SchemaValidator:
    """openapi-core's validator of ``POST /v1/explanations``'s JSON body (``ExplainJsonRequest``), in ``contract``."""
    spec = SchemaPath.from_dict(contract.document)
    return oas31_schema_validators_factory.create(spec, spec / "components" / "schemas" / "ExplainJsonRequest")


def explain_body(name: str, instance: str | dict[str, str], parameters: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/explanations`` JSON body that one instance stands for."""
    image = instance["b64"] if isinstance(instance, dict) else instance
    return {**parameters, "image": image, "model": name}


def _described(error: Exception) -> str:
    """A schema error as the contract's refusals say one: where in the body, then what."""
    where = "/".join(str(part) for part in getattr(error, "absolute_path", [])) or "body"
    return f"{where}: {getattr(error, 'message', str(error))}"


def _checked(validator: SchemaValidator, parts: Services, index: int, body: dict[str, Any]) -> CheckedExplanation:
    """One instance checked as its own submission would be; every refusal names the instance."""
    try:
        validator.validate(body)
    except InvalidSchemaValue as invalid:
        details = sorted(f"instances[{index}]: {_described(error)}" for error in invalid.schema_errors)[:MAX_ERRORS]
        raise Problem(
            422, "Invalid request body", "; ".join(details), problem="invalid_body", errors=details
        ) from invalid
    try:
        submitted: ExplainInput = from_json(body)
        return check_explanation(parts, submitted)
    except (Problem, RequestError, ImageError) as refusal:
        found = problem_for(refusal)  # the status the errors table gives it, the detail prefixed
        raise Problem(
            found.status,
            found.title,
            f"instances[{index}]: {found.detail}",
            problem=found.problem,
            headers=found.headers,
            **found.extra,
        ) from refusal


@blueprint.post("/v1/models/<name>:explain")
@requires_scope(EXPLAIN)
def explain(name: str) -> Response:
    """Explain every instance with model ``name``; wait for all of them, within the bound."""
    parts = services()
    body: dict[str, Any] = integral_numbers(request.get_json(silent=True) or {})  # shaped by the contract
    parameters = body.get("parameters", {})
    validator = body_validator(parts.contract)
    checked = [
        _checked(validator, parts, index, explain_body(name, instance, parameters))
        for index, instance in enumerate(body["instances"])
    ]
    submissions = [submit_explanation(parts, one) for one in checked]
    wait_s = min(float(request.args.get("wait", parts.settings.max_wait_s)), parts.settings.max_wait_s)
    deadline = time.monotonic() + wait_s
    explanations: list[dict[str, Any]] = []
    predictions: list[Any] = []
    finished = True
    for submission in submissions:
        job, result = submission.job, submission.result
        if submission.outcome != "cached":
            job = parts.jobs.wait(job, max(0.0, deadline - time.monotonic()))  # one bound for all of them
            result = stored_result(parts, job, "explanation job")
        finished = finished and job.status in TERMINAL_STATUSES
        view = job_view(job, result, cached=submission.cached)
        explanations.append(view)
        predictions.append(view["result"]["prediction"] if "result" in view else None)
    response = jsonify({"predictions": predictions, "explanations": explanations})
    response.status_code = 200 if finished else 202
    return response
