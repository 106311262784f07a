"""Real parts for the service tests: a redis-server on a free port, a tiny registered ViT, worker processes.

Imported by ``tests/conftest.py`` so that every test module sees these fixtures.
redis-server is required: without it the fixture fails (it never skips), since the
service's tests would otherwise silently prove nothing about Redis.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

import worker  # noqa: F401  (torchvision compatibility before timm)
from classlens.core import fashion_mnist
from classlens.core.processes import free_port, stop_process
from classlens.core.settings import Settings
from model_store.catalog import BUNDLED_SAMPLES

FASHION_LABELS = list(fashion_mnist.LABELS)
TINY_MODEL = "tiny-vit"
TINY_DEPTH = 2
SAMPLES = BUNDLED_SAMPLES
REPO = Path(__file__).resolve().parent.parent


# The canonical parameters of a default request at depth 2, as every stored key was made before.
DEFAULT_EXPLAIN_PARAMETERS = {
    "targets": None,
    "top_k": 3,
    "layers": [2],
    "map_kind": "identifiability",
    "sublayers": True,
    "gradient_map": False,
    "norm": "fresh",
    "bias": True,
}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server (no persistence) for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; the service tests need it (Debian: apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(10)


def add_tiny_vit(work: Path, version: str = "1", seed: int = 0) -> Path:
    """A store root under ``work`` with ``tiny-vit@<version>``: a random 2-block ViT (weights from ``seed``)."""
    from safetensors.torch import save_file

    from model_store.catalog import add_model
    from worker.random_models import random_vit

    args: dict[str, Any] = {
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "depth": TINY_DEPTH,
        "embed_dim": 64,
        "num_heads": 2,
        "num_classes": 10,
    }
    model = random_vit("vit_tiny_patch16_224", seed=seed, **args)
    weights = work / "tiny.safetensors"
    save_file(model.state_dict(), str(weights))
    labels = work / "labels.txt"
    labels.write_text("\n".join(FASHION_LABELS) + "\n")
    root = work / "models"
    fields = {
        "name": TINY_MODEL,
        "version": version,
        "framework": "timm",
        "architecture": "vit_tiny_patch16_224",
        "model_args": args,
        "input": {"height": 28, "width": 28, "channels": 1, "colour_mode": "L"},
        "preprocessing": {"resize": (28, 28), "mean": (0.286,), "std": (0.353,)},
        "provenance": {"data": "random", "recipe": "tests", "date": "2026-01-01", "licence": "MIT"},
        # What registering reads from the built model: the API refuses explanations of a model without it.
        "structure": {
            "family": "timm-vit",
            "layers": TINY_DEPTH,
            "grid": (7, 7),
            "patch_size": (4, 4),
            "prefix_tokens": ("cls",),
            "pooling": "token",
            "width": 64,
            "heads": 2,
        },
    }
    add_model(root, fields, weights, labels)
    return root


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store root with ``tiny-vit@1``: a random 2-block ViT on 28x28 grey images, Fashion-MNIST labels."""
    return add_tiny_vit(tmp_path_factory.mktemp("tiny-model"))


def sample_png(name: str = "test-00002.png") -> bytes:
    return (SAMPLES / name).read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG that *claims* ``width x height``: a decompression bomb as far as a header goes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noise_png(size: int = 256) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a worker subprocess exactly the settings the test's app was built with."""
    env = {"REDIS_URL": settings.redis_url or "", "CLASSLENS_REDIS_URL": settings.redis_url or ""}
    for name, value in settings.model_dump(exclude_defaults=True, exclude={"redis_url"}).items():
        if name == "model_dirs":
            env["CLASSLENS_MODEL_DIRS"] = os.pathsep.join(str(path) for path in value)
        elif value is not None:
            env[f"CLASSLENS_{name.upper()}"] = str(value)
    return env


def start_worker(env: dict[str, str], log: Path, queues: str | None = None) -> subprocess.Popen[bytes]:
    """``classlens worker`` (on ``queues``, comma-separated, or all) in its own process, its output in ``log``."""
    command = [sys.executable, "-m", "classlens.cli", "worker", "--loglevel=WARNING"]
    if queues:
        command.append(f"--queues={queues}")
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        return subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, grace_s=20)


def wait_for_heartbeat(store: object, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    from classlens.core.heartbeat import last_beat

    deadline = time.monotonic() + timeout_s
    while last_beat(store) is None:  # type: ignore[arg-type]
        if process.poll() is not None:
            pytest.fail(f"the worker exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no worker heartbeat after {timeout_s} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


# The API over a module's ``settings`` fixture (each service test module states its own limits).
@pytest.fixture(scope="module")
def store(settings):
    from classlens.core.store import RedisStore

    return RedisStore(settings.redis_url)


@pytest.fixture(scope="module")
def app(settings, store):
    from service.app import create_app

    return create_app(settings, store=store)


@pytest.fixture
def client(app):
    return app.test_client()


@contextmanager
def worker_running(settings, store, log: Path, queues: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A worker for ``settings`` on ``queues`` (or all), ready once its heartbeat is in ``store``; stopped after."""
    process = start_worker(worker_env(settings), log, queues)
    try:
        wait_for_heartbeat(store, process, log)
        yield process
    finally:
        stop_worker(process)


def checked(app, response):
    """The response, after openapi-core has validated it against openapi.yaml."""
    from openapi_core.contrib.werkzeug import WerkzeugOpenAPIResponse
    from openapi_core.testing import MockRequest

    contract = app.extensions["classlens"].contract
    sent = MockRequest("http://localhost", response.request.method.lower(), response.request.path)
    contract.openapi.validate_response(sent, WerkzeugOpenAPIResponse(response))
    return response


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def problem(app, response, status: int, name: str | None = None) -> dict:
    """The problem+json body of ``response``, after checking it against openapi.yaml, its status and its name."""
    checked(app, response)
    assert response.status_code == status, response.get_json()
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    if name is not None:
        assert body["problem"] == name, body
    return body


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def finished_job(app, client, url: str, timeout_s: float = 180) -> dict:
    """Long-poll the job at ``url`` (each response checked against openapi.yaml) until it is finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = checked(app, client.get(f"{url}?wait=5")).get_json()
        if body["status"] in {"succeeded", "failed"}:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def watch_progress(store: object, job_id: str, timeout_s: float = 180) -> list[tuple[int, int]]:
    """Every distinct ``(done, total)`` of the job record, read straight from the store, until it finishes."""
    from classlens.core.contract import Job

    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = Job.model_validate_json(store.get(f"job:{job_id}"))  # type: ignore[attr-defined]
        state = (job.progress.done, job.progress.total)
        if not seen or seen[-1] != state:
            seen.append(state)
        if job.status in {"succeeded", "failed"}:
            return seen
        time.sleep(0.001)
    pytest.fail(f"job {job_id} did not finish; progress seen: {seen}")


def resolve_ref(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` of the OpenAPI ``document`` with its local ``$ref`` chain followed to the definition."""
    while "$ref" in node:
        found: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node
