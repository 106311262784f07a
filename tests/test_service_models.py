"""Models managed while the service runs: the real Flask app, a real redis-server and a real worker process.

Models are added through ``POST /v1/models`` (the worker registers them) and with the CLI's
code path (``worker.registration.register``, in this process) while the API and the worker
run, then explained without restarting either. Every response is validated against openapi.yaml.
"""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import worker  # noqa: F401  (torchvision compatibility before timm)
from classlens.core.queue import MODELS_QUEUE, create_celery, queue_depths
from classlens.core.settings import Settings
from model_store.catalog import DISABLED_FILE
from model_store.sources import ModelSources, RegisterOptions
from service.app import create_app
from service.auth import MODELS_WRITE, required_scope
from tests.service_fixtures import (
    REPO,
    TINY_MODEL,
    checked,
    finished_job,
    problem,
    sample_png,
    worker_running,
)
from worker.registration import register

DB = 9  # a Redis database of this module's own
IDLE_DB = 10  # a broker nobody consumes: what is sent there stays queued
ARCHITECTURE = "vit_tiny_patch16_224"
ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 3}
LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny random ViT's weights (``tiny.safetensors``) and labels files, as a user has them."""
    folder = tmp_path_factory.mktemp("upload-files")
    torch.manual_seed(0)
    model = timm.create_model(ARCHITECTURE, pretrained=False, **ARGS)
    save_file(model.state_dict(), str(folder / "tiny.safetensors"))
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "other-labels.txt").write_text("ant\nbee\ncow\n")
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """This module's store root (where registrations go); tiny_model_root is only read."""
    return tmp_path_factory.mktemp("managed") / "models"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, root, tiny_model_root):
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[root, tiny_model_root],
        data_dir=tmp_path_factory.mktemp("data"),
        worker_heartbeat_s=1,
    )


@pytest.fixture(scope="module")
def running_worker(settings, store, tmp_path_factory):
    with worker_running(settings, store, tmp_path_factory.mktemp("worker") / "worker.log") as process:
        yield process


def form(files: Path, name: str, labels: str = "labels.txt", **fields) -> dict:
    return {
        "weights": (io.BytesIO((files / "tiny.safetensors").read_bytes()), "my tiny.safetensors"),
        "labels": (io.BytesIO((files / labels).read_bytes()), "classes.txt"),
        "name": name,
        "architecture": ARCHITECTURE,
        "model_args": json.dumps(ARGS),
        **fields,
    }


def post_model(client, data: dict, query: str = "?wait=30"):
    return client.post(f"/v1/models{query}", data=data, content_type="multipart/form-data")


def registered(app, client, data: dict) -> dict:
    response = checked(app, post_model(client, data))
    assert response.status_code in {200, 202}, response.get_json()
    assert response.headers["Location"] == f"/v1/models/jobs/{response.get_json()['id']}"
    return finished_job(app, client, response.headers["Location"])


def explain(app, client, model: str, image: bytes | None = None) -> dict:
    data = {"image": (io.BytesIO(image or sample_png()), "image.png"), "model": model, "top_k": "3"}
    response = checked(app, client.post("/v1/explanations?wait=30", data=data, content_type="multipart/form-data"))
    assert response.status_code in {200, 202}, response.get_json()
    body = response.get_json()
    if body["status"] in {"queued", "running"}:
        body = finished_job(app, client, f"/v1/explanations/{body['id']}") | {"cached": body["cached"]}
    return body


def add_with_cli_code_path(files: Path, root: Path, name: str, version: str = "1") -> None:
    """What ``classlens models add`` does, in this process: the API and the worker are not told."""
    sources = ModelSources.locate(files / "tiny.safetensors", labels=files / "labels.txt")
    register(sources, RegisterOptions(name=name, version=version, architecture=ARCHITECTURE, model_args=ARGS), root)


# -- registering through the API ---------------------------------------------------------------------------


def test_register_through_the_api_explain_and_register_again_with_other_labels(
    app, client, settings, running_worker, files
):
    job = registered(app, client, form(files, "uploaded"))
    assert job["status"] == "succeeded", job
    assert job["kind"] == "model"
    assert job["model"] == "uploaded@1"
    assert job["parameters"]["files"] == {"weights": "my_tiny.safetensors", "labels": "labels.txt"}
    result = job["result"]
    assert result["reference"] == "uploaded@1"
    assert result["classes"] == 3
    assert result["structure"]["layers"] == 2
    assert job["links"]["model"] == "/v1/models/uploaded@1"
    assert not (settings.upload_dir / job["id"]).exists()  # the upload is removed once registered

    model = checked(app, client.get(job["links"]["model"])).get_json()
    assert model["structure_source"] == "manifest"
    assert model["family"] == result["structure"]["family"]
    assert (model["layers"], model["grid"], model["patch_size"]) == (2, [4, 4], [8, 8])
    assert model["prefix_tokens"] == ["cls"]
    assert model["pooling"] == "token"
    assert model["labels"] == LABELS
    assert model["preprocessing"]["crop"] == [32, 32]
    assert model["preprocessing"]["source"]["crop_pct"] == 0.9  # the full preprocessing, where it came from too

    first = explain(app, client, "uploaded")
    assert first["status"] == "succeeded", first
    assert {target["label"] for target in first["result"]["targets"]} <= set(LABELS)
    assert explain(app, client, "uploaded")["cached"] is True

    # The same weights registered again with corrected labels: a fresh result, never the old one.
    again = registered(app, client, form(files, "uploaded", "other-labels.txt", overwrite="true"))
    assert again["status"] == "succeeded", again
    assert again["result"]["weights_sha256"] == result["weights_sha256"]
    assert again["result"]["result_fingerprint"] != result["result_fingerprint"]
    relabelled = explain(app, client, "uploaded")
    assert relabelled["cached"] is False, relabelled
    assert relabelled["id"] != first["id"], relabelled
    assert {target["label"] for target in relabelled["result"]["targets"]} <= {"ant", "bee", "cow"}
    assert [t["logit"] for t in relabelled["result"]["targets"]] == [t["logit"] for t in first["result"]["targets"]]

    # ... and with another mean and std: fresh again, and the numbers change with the input.
    normalised = registered(
        app, client, form(files, "uploaded", "other-labels.txt", overwrite="true", mean="0.1,0.2,0.3")
    )
    assert normalised["status"] == "succeeded", normalised
    renormalised = explain(app, client, "uploaded")
    assert renormalised["cached"] is False
    assert renormalised["result"]["prediction"] != relabelled["result"]["prediction"]


def test_a_registration_the_worker_refuses_fails_with_its_reason(app, client, settings, running_worker, files):
    data = form(files, "broken")
    data["weights"] = (io.BytesIO(b"not a safetensors file at all"), "broken.safetensors")
    job = registered(app, client, data)
    assert job["status"] == "failed"
    assert job["error"]["title"] == "The model cannot be registered"
    assert "safetensors" in job["error"]["detail"]
    assert not (settings.upload_dir / job["id"]).exists()
    problem(app, client.get("/v1/models/broken"), 404, "unknown_model")


def test_a_model_added_with_the_cli_while_the_service_runs_is_explained(app, client, running_worker, files, root):
    problem(app, client.get("/v1/models/from-cli"), 404, "unknown_model")
    add_with_cli_code_path(files, root, "from-cli")
    # Neither the API nor the worker was restarted or told: both catalogs find it on their own.
    body = explain(app, client, "from-cli")
    assert body["status"] == "succeeded", body
    assert body["result"]["model"]["name"] == "from-cli"
    assert body["model"] == "from-cli@1"
    listed = checked(app, client.get("/v1/models")).get_json()["models"]
    assert "from-cli@1" in [row["reference"] for row in listed]


# -- disabling ---------------------------------------------------------------------------------------------


def test_disable_a_version(app, client, running_worker, files, root):
    for version in ("1", "2"):
        add_with_cli_code_path(files, root, "retiring", version)
    image = sample_png("test-00003.png")
    before = explain(app, client, "retiring@1", image)
    assert before["status"] == "succeeded", before
    target = before["result"]["targets"][0]["index"]
    assert checked(app, client.get(f"/v1/explanations/{before['id']}/maps/{target}.png")).status_code == 200

    response = client.delete("/v1/models/retiring@1")
    assert checked(app, response).status_code == 204
    assert response.data == b""
    assert (root / "retiring" / "1" / DISABLED_FILE).is_file()
    assert (root / "retiring" / "1" / "manifest.yaml").is_file()
    assert checked(app, client.delete("/v1/models/retiring@1")).status_code == 204  # idempotent

    # Its results are no longer served, and no new work is accepted for it.
    problem(app, client.get(f"/v1/explanations/{before['id']}"), 410, "model_disabled")
    problem(app, client.get(f"/v1/explanations/{before['id']}/maps/{target}.png"), 410, "model_disabled")
    data = {"image": (io.BytesIO(image), "image.png"), "model": "retiring@1"}
    refused = client.post("/v1/explanations", data=data, content_type="multipart/form-data")
    assert "retiring@1 is disabled" in problem(app, refused, 422, "model_disabled")["detail"]
    problem(app, client.get("/v1/models/retiring@1"), 410, "model_disabled")

    # The name alone is the newest version still served; the same weights there are not a cache hit.
    after = explain(app, client, "retiring", image)
    assert after["model"] == "retiring@2"
    assert after["cached"] is False
    assert after["status"] == "succeeded"

    listed = checked(app, client.get("/v1/models")).get_json()["models"]
    [row] = [row for row in listed if row["name"] == "retiring"]
    assert row["version"] == "2"
    assert row["versions"] == ["2"]
    assert row["disabled"] is False
    everything = checked(app, client.get("/v1/models?include_disabled=true")).get_json()["models"]
    assert [(r["reference"], r["disabled"]) for r in everything if r["name"] == "retiring"] == [
        ("retiring@2", False),
        ("retiring@1", True),
    ]
    shown = checked(app, client.get("/v1/models/retiring@1?include_disabled=true")).get_json()
    assert shown["disabled"] is True
    assert shown["labels"] == LABELS

    # Enabled again by deleting the marker: served again.
    (root / "retiring" / "1" / DISABLED_FILE).unlink()
    app.extensions["classlens"].catalog.refresh()  # rather than wait for catalog_refresh_s
    assert checked(app, client.get(f"/v1/explanations/{before['id']}")).get_json()["status"] == "succeeded"


def test_disabling_needs_an_existing_version(app, client):
    body = problem(app, client.delete(f"/v1/models/{TINY_MODEL}"), 422, "version_required")
    assert f"{TINY_MODEL}@VERSION" in body["detail"]
    problem(app, client.delete(f"/v1/models/{TINY_MODEL}@99"), 404, "unknown_model")
    problem(app, client.delete("/v1/models/nothing-like-it@1"), 404, "unknown_model")
    assert client.delete("/v1/models").status_code == 405


# -- bad forms: a 4xx problem, nothing queued --------------------------------------------------------------


@pytest.fixture(scope="module")
def idle(settings, store, redis_url):
    """An API whose queue nobody consumes: anything it sent would stay there to be counted."""
    celery = create_celery(settings.model_copy(update={"redis_url": f"{redis_url}/{IDLE_DB}"}))
    return create_app(settings, store=store, celery=celery), celery


def _without(data: dict, *names: str) -> dict:
    return {key: value for key, value in data.items() if key not in names}


BAD_FORMS = [
    ("no weights", lambda d: _without(d, "weights"), 422, None),
    ("no name", lambda d: _without(d, "name"), 422, "invalid_body"),
    ("weights suffix", lambda d: d | {"weights": (io.BytesIO(b"x" * 10), "weights.txt")}, 415, "unsupported_weights"),
    ("empty weights", lambda d: d | {"weights": (io.BytesIO(b""), "w.safetensors")}, 422, "empty_file"),
    ("unknown field", lambda d: d | {"mena": "0.5"}, 422, "unknown_field"),
    ("unknown file", lambda d: d | {"extra": (io.BytesIO(b"{}"), "x.json")}, 422, "unknown_field"),
    ("model_args not JSON", lambda d: d | {"model_args": "{depth: 2"}, 422, "bad_parameter"),
    ("model_args a list", lambda d: d | {"model_args": "[1, 2]"}, 422, "bad_parameter"),
    ("size", lambda d: d | {"input_size": "224"}, 422, "invalid_body"),
    ("zero size", lambda d: d | {"input_size": "0x224"}, 422, "bad_parameter"),
    ("mean", lambda d: d | {"mean": "0.5,zero"}, 422, "invalid_body"),
    ("two means", lambda d: d | {"mean": "0.5,0.5"}, 422, "bad_parameter"),
    ("colour mode", lambda d: d | {"colour_mode": "CMYK"}, 422, "invalid_body"),
    ("interpolation", lambda d: d | {"interpolation": "cubic"}, 422, "invalid_body"),
    ("boolean", lambda d: d | {"overwrite": "yes"}, 422, "invalid_body"),
    ("name", lambda d: d | {"name": "../../etc"}, 422, "invalid_body"),
    ("config not JSON", lambda d: d | {"config": (io.BytesIO(b"{nope"), "config.json")}, 422, "bad_file"),
    ("config a list", lambda d: d | {"config": (io.BytesIO(b"[1]"), "config.json")}, 422, "bad_file"),
    ("labels not UTF-8", lambda d: d | {"labels": (io.BytesIO(b"\xff\xfe\x00c"), "l.txt")}, 422, "bad_file"),
]


@pytest.mark.parametrize(("case", "change", "status", "name"), BAD_FORMS, ids=[case[0] for case in BAD_FORMS])
def test_a_bad_form_is_refused_before_anything_is_queued(idle, settings, files, case, change, status, name):
    api, celery = idle
    client = api.test_client()
    uploads = set(settings.upload_dir.iterdir()) if settings.upload_dir.exists() else set()
    body = problem(api, post_model(client, change(form(files, "refused"))), status, name)
    assert body["detail"]
    assert queue_depths(celery, (MODELS_QUEUE,)).get(MODELS_QUEUE, 0) == 0
    assert (set(settings.upload_dir.iterdir()) if settings.upload_dir.exists() else set()) == uploads


def test_an_existing_version_needs_overwrite(idle, settings, files, root):
    api, celery = idle
    add_with_cli_code_path(files, root, "taken")
    body = problem(api, post_model(api.test_client(), form(files, "taken")), 409, "model_exists")
    assert "overwrite=true" in body["detail"]
    assert queue_depths(celery, (MODELS_QUEUE,)).get(MODELS_QUEUE, 0) == 0

    queued = checked(api, post_model(api.test_client(), form(files, "taken", overwrite="true"), query=""))
    assert queued.status_code == 202
    assert queued.get_json()["status"] == "queued"
    assert queue_depths(celery, (MODELS_QUEUE,))[MODELS_QUEUE] == 1  # on the models queue, its own
    folder = settings.upload_dir / queued.get_json()["id"]
    assert sorted(path.name for path in folder.iterdir()) == ["labels.txt", "my_tiny.safetensors"]


def test_an_upload_larger_than_the_model_limit_is_refused(settings, store, files):
    small = create_app(settings.model_copy(update={"max_model_upload_bytes": 1000}), store=store)
    problem(small, post_model(small.test_client(), form(files, "too-big")), 413, "too_large")
    # The model limit, not the images' (max_upload_bytes), applies: weights are larger than images.
    roomy = create_app(settings.model_copy(update={"max_upload_bytes": 1000}), store=store)
    response = checked(roomy, post_model(roomy.test_client(), form(files, "not-too-big"), query=""))
    assert response.status_code == 202


def test_an_unknown_registration_job(app, client):
    problem(app, client.get("/v1/models/jobs/0123456789abcdef"), 404, "unknown_job")


# -- what the catalog says about each model ----------------------------------------------------------------


def test_a_model_without_a_structure_is_described_by_guesses(app, client, root, tiny_model_root):
    import shutil

    from model_store.manifest import read_manifest, write_manifest

    folder = root / "no-structure" / "1"  # an older manifest, written before registration read structures
    shutil.copytree(tiny_model_root / TINY_MODEL / "1", folder)
    manifest = read_manifest(folder / "manifest.yaml").model_copy(update={"name": "no-structure", "structure": None})
    write_manifest(manifest, folder / "manifest.yaml")
    model = checked(app, client.get("/v1/models/no-structure")).get_json()
    assert model["structure_source"] == "guessed"
    assert model["family"] is None
    assert (model["layers"], model["grid"], model["patch_size"]) == (2, [7, 7], [4, 4])
    assert model["prefix_tokens"] == ["cls"]
    assert model["pooling"] == "token"
    assert model["preprocessing"]["mean"] == [0.286]
    assert model["framework"] == "timm"


# -- the write routes' scope, and the API's imports --------------------------------------------------------


def test_the_write_routes_carry_the_admin_scope_in_the_code_and_the_contract(app):
    scoped = {
        (rule.rule, method): required_scope(app.view_functions[rule.endpoint])
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if required_scope(app.view_functions[rule.endpoint])
    }
    reference = "/v1/models/<name>/versions/<version>/reference"
    assert scoped == {
        ("/v1/models", "POST"): MODELS_WRITE,
        ("/v1/models/<name>", "DELETE"): MODELS_WRITE,
        **{(reference, method): MODELS_WRITE for method in ("PUT", "GET", "DELETE")},
        ("/v1/models/<name>:explain", "POST"): "explain",
    }
    document = yaml.safe_load((REPO / "openapi.yaml").read_text())
    in_contract = {
        (path.replace("{", "<").replace("}", ">"), method.upper()): operation["x-required-scope"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if "x-required-scope" in operation
    }
    assert in_contract == scoped


def test_the_api_never_imports_torch(tmp_path, files):
    script = textwrap.dedent(
        f"""
        import io, sys
        from classlens.core.settings import Settings
        from service.app import create_app
        app = create_app(Settings(data_dir={str(tmp_path)!r}, redis_url=None, max_wait_s=0))
        client = app.test_client()
        assert client.get("/v1/models").status_code == 200
        data = {{"weights": (io.BytesIO(b"x" * 100), "w.safetensors"), "name": "n", "mean": "0.5"}}
        assert client.post("/v1/models", data=data, content_type="multipart/form-data").status_code == 202
        assert client.delete("/v1/models/fmnist-vit").status_code == 422
        loaded = sorted(name for name in ("torch", "timm", "transformers", "worker") if name in sys.modules)
        print(",".join(loaded) or "none")
        """
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


def test_upload_folders_whose_task_never_ran_are_swept_once_old(tmp_path):
    import os
    import time

    from classlens.core.jobs import JobStore
    from classlens.core.store import SqliteStore
    from model_store.catalog import Catalog
    from worker.jobs.registration import sweep_uploads
    from worker.jobs.runtime import Runtime
    from worker.runtime import ModelCache

    settings = Settings(redis_url=None, data_dir=tmp_path)
    jobs = JobStore(SqliteStore(tmp_path / "store.sqlite3"), ttl_s=60, inflight_ttl_s=60)
    rt = Runtime(settings, jobs, ModelCache(Catalog([tmp_path / "none"]), torch.device("cpu")), os.getpid())
    waiting = jobs.create(job_id="waiting", kind="model", model="m@1", parameters={}, enqueue=lambda job: None)
    finished = jobs.fail(
        jobs.create(job_id="done", kind="model", model="m@1", parameters={}, enqueue=lambda j: None), "x", "y"
    )
    old = time.time() - settings.model_add_time_limit_s - 60
    for name in ("orphan", waiting.id, finished.id, "being-written"):
        (settings.upload_dir / name).mkdir(parents=True)
        if name != "being-written":  # the API writes the files before the job record: young folders stay
            os.utime(settings.upload_dir / name, (old, old))
    sweep_uploads(rt)
    assert sorted(path.name for path in settings.upload_dir.iterdir()) == ["being-written", "waiting"]
