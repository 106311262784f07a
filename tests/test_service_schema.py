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
from schemathesis.specs.openapi.checks import positive_data_acceptance

from classlens.settings import Settings
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
NEEDS_A_REAL_IMAGE = {"createExplanation", "createAudit", "createAnalysis"}
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
        case.call_and_validate(excluded_checks=excluded)

    return check


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
    assert queued.status_code == 202 and queued.get_json()["kind"] == "model"
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
