"""Every checkpoint format, registered in one command while the service runs, explained through the API.

A real redis-server, the real Flask app and one real worker process run for the whole
module. Each format is written by the libraries' own save functions, registered with the
real ``classlens models add`` command (a subprocess: neither the API nor the worker is told)
or uploaded through ``POST /v1/models``, and then explained through
``POST /v1/explanations`` on a non-square photo. The service's top prediction and its logit
must be the model's own on the input its own eval transform makes (timm's
``create_transform``, transformers' Pillow image processor): that checks the weights, the
preprocessing and the lens end to end.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_input_data_config
from timm.models import save_for_hf

import worker  # noqa: F401  (torchvision compatibility before timm)
from classlens.core.settings import Settings
from tests.checkpoints import ARCH, LABELS, TINY, hf_config, tiny_vit, train_checkpoint
from tests.service_fixtures import REPO, checked, finished_job, worker_running

DB = 11  # a Redis database of this module's own


@dataclass
class Format:
    """One way users have a model: the files, how to register them, and what the model itself computes."""

    path: Path  # what `classlens models add` is given (a folder or a file)
    cli_args: list[str]
    model: torch.nn.Module  # the model as its owner runs it
    reference_input: Callable[[Image.Image], torch.Tensor]  # the owner's own eval transform, [C, H, W]
    uploads: dict[str, Path]  # the files POST /v1/models takes
    labels: tuple[str, ...] = tuple(LABELS)  # the class names the registration must end with


def _timm_input(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    transform = create_transform(**resolve_input_data_config(model))
    return lambda image: transform(image.convert("RGB"))


def _hf_input(image: Image.Image) -> torch.Tensor:
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def _labels(folder: Path) -> Path:
    path = folder / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def _timm_folder(folder: Path, safe: bool) -> Format:
    model = tiny_vit()
    save_for_hf(model, folder, model_config={"label_names": LABELS}, safe_serialization=safe)
    weights = folder / ("model.safetensors" if safe else "pytorch_model.bin")
    return Format(folder, [], model, _timm_input(model), {"weights": weights, "config": folder / "config.json"})


def _state_dict(folder: Path, suffix: str, prefix: str = "") -> Format:
    folder.mkdir(parents=True)
    model = tiny_vit()
    state = {prefix + key: value for key, value in model.state_dict().items()}
    weights = folder / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(weights))
    else:
        torch.save(state, weights)
    labels = _labels(folder)
    args = ["--architecture", ARCH, "--model-args", json.dumps(TINY), "--labels", str(labels)]
    return Format(weights, args, model, _timm_input(model), {"weights": weights, "labels": labels})


def _train_checkpoint(folder: Path, ema: bool) -> Format:
    model, model_ema, checkpoint = train_checkpoint(folder)
    chosen = model_ema if ema and model_ema is not None else model
    # train.py does not record class names: the registration names them class_0 ... and warns.
    unnamed = tuple(f"class_{i}" for i in range(4))
    return Format(checkpoint, ["--ema"] if ema else [], chosen, _timm_input(chosen), {"weights": checkpoint}, unnamed)


def _transformers_folder(folder: Path, teacher: bool) -> Format:
    from transformers import (
        DeiTConfig,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    label_maps = {"id2label": dict(enumerate(LABELS)), "label2id": {v: k for k, v in enumerate(LABELS)}}
    model_class, config_class = (
        (DeiTForImageClassificationWithTeacher, DeiTConfig) if teacher else (ViTForImageClassification, ViTConfig)
    )
    model = model_class(hf_config(config_class, **label_maps)).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    uploads = {
        "weights": folder / "model.safetensors",
        "config": folder / "config.json",
        "preprocessor_config": folder / "preprocessor_config.json",
    }
    return Format(folder, [], model, _hf_input, uploads)


FORMATS: dict[str, Callable[[Path], Format]] = {
    "timm folder, safetensors": lambda folder: _timm_folder(folder, safe=True),
    "timm folder, pytorch_model.bin": lambda folder: _timm_folder(folder, safe=False),
    "state dict .pth": lambda folder: _state_dict(folder, ".pth"),
    "state dict .safetensors": lambda folder: _state_dict(folder, ".safetensors"),
    "DDP state dict .pt": lambda folder: _state_dict(folder, ".pt", prefix="module."),
    "train.py checkpoint": lambda folder: _train_checkpoint(folder, ema=False),
    "train.py checkpoint, EMA weights": lambda folder: _train_checkpoint(folder, ema=True),
    "transformers ViT folder": lambda folder: _transformers_folder(folder, teacher=False),
    "transformers DeiT with teacher folder": lambda folder: _transformers_folder(folder, teacher=True),
}
# Uploaded through POST /v1/models as well: one of each kind of source.
UPLOADED = ["timm folder, safetensors", "train.py checkpoint", "transformers ViT folder"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats") / "models"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url, root):
    return Settings(
        redis_url=f"{redis_url}/{DB}",
        model_dirs=[root],
        data_dir=tmp_path_factory.mktemp("data"),
        worker_heartbeat_s=1,
    )


@pytest.fixture(scope="module")
def running_worker(settings, store, tmp_path_factory):
    with worker_running(settings, store, tmp_path_factory.mktemp("worker") / "worker.log") as process:
        yield process


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A non-square photo (48 wide, 30 high): timm's shorter-side resize and centre crop both act on it."""
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(30, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _name(case: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in case.lower()).strip("-")


def _explained(app, client, model: str, photo: Image.Image) -> dict:
    data = {"image": (io.BytesIO(_png(photo)), "photo.png"), "model": model, "top_k": "2"}
    response = checked(app, client.post("/v1/explanations?wait=60", data=data, content_type="multipart/form-data"))
    assert response.status_code in {200, 202}, response.get_json()
    body = response.get_json()
    if body["status"] not in {"succeeded", "failed"}:
        body = finished_job(app, client, f"/v1/explanations/{body['id']}")
    assert body["status"] == "succeeded", body
    return body["result"]


def _is_the_models_own(result: dict, made: Format, photo: Image.Image) -> None:
    with torch.no_grad():
        output = made.model(made.reference_input(photo)[None])
    logits = (output.logits if hasattr(output, "logits") else output)[0]
    top = result["prediction"][0]
    assert top["index"] == int(logits.argmax())
    assert abs(top["logit"] - float(logits.max())) < 1e-4
    assert top["label"] == made.labels[top["index"]]


@pytest.mark.parametrize("case", list(FORMATS))
def test_registered_with_the_cli_while_the_service_runs_then_explained(
    app, client, running_worker, settings, root, tmp_path, photo, case
):
    made = FORMATS[case](tmp_path / "files")
    name = _name(case)
    environment = {**os.environ, "CLASSLENS_DATA_DIR": str(settings.data_dir), "CLASSLENS_MODEL_DIRS": str(root)}
    command = [sys.executable, "-m", "classlens.cli", "models", "add", str(made.path), "--name", name, *made.cli_args]
    added = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stdout + added.stderr
    assert f"registered {name}@1" in added.stdout

    described = checked(app, client.get(f"/v1/models/{name}")).get_json()
    assert described["layers"] == 2
    assert described["grid"] == [4, 4]
    _is_the_models_own(_explained(app, client, name, photo), made, photo)


@pytest.mark.parametrize("case", UPLOADED)
def test_uploaded_through_the_api_then_explained(app, client, running_worker, tmp_path, photo, case):
    made = FORMATS[case](tmp_path / "files")
    name = f"up-{_name(case)}"
    files = {part: (io.BytesIO(path.read_bytes()), path.name) for part, path in made.uploads.items()}
    response = checked(
        app, client.post("/v1/models?wait=60", data={**files, "name": name}, content_type="multipart/form-data")
    )
    assert response.status_code in {200, 202}, response.get_json()
    job = finished_job(app, client, response.headers["Location"])
    assert job["status"] == "succeeded", job
    _is_the_models_own(_explained(app, client, name, photo), made, photo)
