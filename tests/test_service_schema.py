"""Schemathesis: generated requests (valid and invalid) against openapi.yaml and the real app (WSGI).

Every response must be documented (status, content type, headers, body schema) and no
request may cause a 5xx. The app runs embedded (SQLite, filesystem broker) without a worker:
whatever it accepts just stays queued. Cases are drawn with Hypothesis directly (schemathesis'
pytest plugin does not support this pytest), positive and negative, per operation.
"""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth, negative_data_rejection, positive_data_acceptance

from classlens.core.settings import Settings
from service.app import create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_model_root):
    app = create_app(
        Settings(
            redis_url=None,
            data_dir=tmp_path_factory.mktemp("schemathesis"),
            model_dirs=[tiny_model_root],
            max_wait_s=0,
            max_upload_bytes=1_000_000,
        )
    )
    return schemathesis.openapi.from_wsgi("/openapi.yaml", app)


FUZZ_EXAMPLES = int(os.environ.get("CLASSLENS_FUZZ_EXAMPLES", "0"))
# The contract cannot say "a decodable image": a schema-valid upload may still be refused (422).
NEEDS_A_REAL_IMAGE = {"createExplanation", "createAudit", "createAnalysis", "kserveExplain"}
# Nor "a weights file named like one" (415) or "name@version of a registered model" (404, 422).
NEEDS_A_REAL_MODEL = {"createModel", "disableModel"}
# Without a worker the app is rightly not ready: /readyz answers its documented 503.
NOT_READY = {"readyz"}


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def _checker(operation, mode, excluded):
    """A Hypothesis test over ``operation``'s generated cases, each sent to the app and validated."""

    @given(case=operation.as_strategy(generation_mode=mode))
    # By default the same 30 cases every run, so CI never fails by the luck of the draw; set
    # CLASSLENS_FUZZ_EXAMPLES=500 to explore with fresh random cases.
    @settings(
        max_examples=FUZZ_EXAMPLES or 30,
        derandomize=not FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        skipped = [*excluded, ignored_auth]
        if _only_credentials_negated(case):
            skipped.append(negative_data_rejection)
        case.call_and_validate(excluded_checks=skipped)

    return check


def _only_credentials_negated(case) -> bool:
    """Whether a negative case's only invalid part is its ``Authorization`` header.

    The app under test is built without API keys, so authentication is off and such a request is
    rightly served (ignored_auth is skipped for the same reason); every other check still applies.
    """
    data = getattr(getattr(getattr(case, "meta", None), "phase", None), "data", None)
    if data is None:
        return False
    names = {getattr(data, "parameter", None)} | {m.parameter for m in getattr(data, "mutations", []) or []}
    names.discard(None)
    return bool(names) and {str(name).lower() for name in names} == {"authorization"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_api_conforms_to_its_contract(api_schema, mode):
    failures = []
    for operation in _operations(api_schema):
        name = operation.definition.raw.get("operationId")
        excluded = [positive_data_acceptance] if name in NEEDS_A_REAL_IMAGE | NEEDS_A_REAL_MODEL else []
        excluded += [not_a_server_error] if name in NOT_READY else []

        check = _checker(operation, mode, excluded)
        try:
            check()
        except Unsatisfiable:  # nothing to negate: an operation without parameters or body
            continue
        except Exception as error:
            failures.append(f"{operation.label}: {error}")
    assert not failures, "\n\n".join(failures)


# The POST routes, with half of the generated cases made realistic: a registered model and real PNGs
# where the schema has a model or an image, so that they pass the contract and reach the handlers.
REALISTIC_EXAMPLES = int(os.environ.get("CLASSLENS_REALISTIC_EXAMPLES", "25"))
REACHES_A_HANDLER = ("createExplanation", "createAudit", "createAnalysis")


def _realistic(body, png, multipart: bool):
    """``body`` with its model a registered one and its images decodable PNGs (at least four of them).

    An image is a file part in a multipart body and base64 text in a JSON one, whatever type the
    generated value had (a negative case may have drawn a number where the schema wants text).
    """
    from tests.service_fixtures import TINY_MODEL, b64

    if not isinstance(body, dict):
        return body
    body = dict(body)
    if "model" in body:
        body["model"] = TINY_MODEL
    kind = body.get("kind")
    if (kind in {"cka", "compare"} and "compare_to" in body) or kind == "compare":
        body["compare_to"] = "fmnist-vit@1"
    elif kind is not None:  # parameters of other kinds than this one are refused, rightly
        body.pop("compare_to", None)
    if kind is not None and kind != "perturb":
        body.pop("region", None)
    if body.get("image") is not None:
        body["image"] = png if multipart else b64(png)
    images = body.get("images")
    if isinstance(images, list) and images:
        if all(isinstance(item, dict) for item in images):
            body["images"] = [{**item, "image": b64(png)} for item in images]
            body["images"] += [{"image": b64(png)}] * max(0, 4 - len(images))
            if any("label" in item for item in body["images"]):  # every image labelled, with a real class
                body["images"] = [{**item, "label": index % 10} for index, item in enumerate(body["images"])]
        elif multipart:
            body["images"] = [png] * max(4, len(images))
            body.pop("archive", None)
            if isinstance(body.get("labels"), list) and body["labels"]:
                body["labels"] = [str(index % 10) for index in range(len(body["images"]))]
    return body


def _realistic_checker(operation, mode, png, statuses):
    """As :func:`_checker`, with half of the cases made :func:`_realistic`; each status is kept in ``statuses``."""
    from hypothesis import strategies as st

    @given(drawn=st.tuples(operation.as_strategy(generation_mode=mode), st.booleans()))
    @settings(
        max_examples=REALISTIC_EXAMPLES,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(drawn):
        case, realistic = drawn
        # The app is built without API keys, so authentication is off and any credentials are let through.
        excluded = [positive_data_acceptance, ignored_auth]
        if realistic:
            case.body = _realistic(case.body, png, multipart=(case.media_type or "").startswith("multipart/"))
            # A negative case may be valid once its model and images are replaced: whether it should be
            # refused is no longer what schemathesis generated it to be. A 5xx is still a failure.
            excluded.append(negative_data_rejection)
        response = case.call_and_validate(excluded_checks=excluded)
        statuses.append(response.status_code)

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_requests_with_a_real_model_and_image_reach_the_handlers_without_a_server_error(api_schema, mode):
    """Generated bodies with a real model and real PNGs: no 5xx, every response documented, some accepted."""
    from tests.service_fixtures import sample_png

    png = sample_png()
    statuses: dict[str, list[int]] = {}
    failures = []
    for operation in _operations(api_schema):
        name = operation.definition.raw.get("operationId")
        if name not in REACHES_A_HANDLER:
            continue
        check = _realistic_checker(operation, mode, png, statuses.setdefault(name, []))
        try:
            check()
        except Exception as error:
            failures.append(f"{operation.label}: {error}")
    assert not failures, "\n\n".join(failures)
    if mode == GenerationMode.POSITIVE:  # the realistic cases got past the contract to the handlers' own work
        for name in REACHES_A_HANDLER:
            assert any(status in {200, 202} for status in statuses[name]), (name, sorted(set(statuses[name])))


def test_every_route_is_in_the_contract(api_schema):
    """The fuzzing above covers an operation only if the contract has it: the model routes included."""
    names = {operation.definition.raw.get("operationId") for operation in _operations(api_schema)}
    assert {"listModels", "getModel", "createModel", "getModelJob", "disableModel"} <= names


def test_the_model_routes_answer_as_the_contract_says(tmp_path, tiny_model_root):
    """One real case per new response (the fuzzing rarely names a real model or a weights file)."""
    import io
    import shutil

    from tests.service_fixtures import TINY_MODEL, checked, problem

    root = tmp_path / "models"
    shutil.copytree(tiny_model_root / TINY_MODEL, root / TINY_MODEL)
    app = create_app(Settings(redis_url=None, data_dir=tmp_path / "data", model_dirs=[root], max_wait_s=0))
    client = app.test_client()
    data = {"weights": (io.BytesIO(b"x" * 64), "w.safetensors"), "name": "fresh", "std": "0.5"}
    queued = checked(app, client.post("/v1/models", data=data, content_type="multipart/form-data"))
    assert queued.status_code == 202
    assert queued.get_json()["kind"] == "model"
    assert checked(app, client.get(queued.headers["Location"])).get_json()["status"] == "queued"
    data = {"weights": (io.BytesIO(b"x" * 64), "w.safetensors"), "name": TINY_MODEL}
    problem(app, client.post("/v1/models", data=data, content_type="multipart/form-data"), 409, "model_exists")
    assert checked(app, client.delete(f"/v1/models/{TINY_MODEL}@1")).status_code == 204
    problem(app, client.get(f"/v1/models/{TINY_MODEL}@1"), 410, "model_disabled")
    listed = checked(app, client.get("/v1/models?include_disabled=true")).get_json()["models"]
    assert [(row["reference"], row["disabled"]) for row in listed if row["name"] == TINY_MODEL] == [
        (f"{TINY_MODEL}@1", True)
    ]
    checked(app, client.get(f"/v1/models/{TINY_MODEL}@1?include_disabled=true"))
    problem(app, client.get("/v1/models?include_disabled=maybe"), 400, "bad_parameter")
