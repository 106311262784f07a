"""The `classlens models ...` commands, run through the real click entry point."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from model_store.catalog import Catalog
from worker.model_loader import load_model
from worker.random_models import random_vit


@pytest.fixture
def run(cli):
    """The CLI with an isolated data dir (so `models add` never touches the bundled store)."""
    return cli


def test_list_show_verify_bundled(run):
    listed = run("models", "list")
    assert listed.exit_code == 0
    assert "fmnist-vit@1" in listed.output
    assert "fmnist-resnet@1" in listed.output
    rows = json.loads(run("models", "list", "--json").output)
    assert {row["name"] for row in rows} >= {"fmnist-vit", "fmnist-resnet"}
    shown = json.loads(run("models", "show", "fmnist-vit").output)
    assert shown["label_names"][9] == "Ankle boot"
    assert shown["input"]["channels"] == 1
    verified = run("models", "verify")
    assert verified.exit_code == 0
    assert "ok      fmnist-vit@1" in verified.output


def test_show_unknown_model_is_a_clear_error(run):
    result = run("models", "show", "nope")
    assert result.exit_code == 1
    assert "unknown model 'nope'" in result.output


def test_verify_fails_on_a_tampered_copy(run, store_copy, monkeypatch):
    weights = store_copy / "fmnist-resnet" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setenv("CLASSLENS_MODEL_DIRS", str(store_copy))
    result = run("models", "verify", "fmnist-resnet")
    assert result.exit_code == 1
    assert "FAILED  fmnist-resnet@1" in result.output
    assert "sha256" in result.output


def _user_checkpoint(tmp_path, suffix=".safetensors", num_classes=3):
    model = random_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=num_classes)
    weights = tmp_path / f"user{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(weights))
    else:
        torch.save({"model": model.state_dict()}, weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    return model, weights, labels


ADD_ARGS = (
    "--architecture",
    "vit_tiny_patch16_224",
    "--input-size",
    "32x32",
    "--model-args",
    '{"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3}',
)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_add_round_trip(run, tmp_path, suffix):
    model, weights, labels = _user_checkpoint(tmp_path, suffix)
    result = run(
        "models",
        "add",
        "--name",
        "pets",
        "--version",
        "3",
        "--weights",
        weights,
        "--labels",
        labels,
        *ADD_ARGS,
        "--data",
        "our photos",
        "--licence",
        "proprietary",
    )
    assert result.exit_code == 0, result.output
    assert "registered pets@3" in result.output

    listed = {row["name"]: row for row in json.loads(run("models", "list", "--json").output)}
    assert listed["pets"]["classes"] == 3
    assert listed["pets"]["input"] == "32x32 RGB"
    assert run("models", "verify", "pets").exit_code == 0

    entry = Catalog([tmp_path / "data" / "models"]).resolve("pets@3")
    assert entry.labels() == ["cat", "dog", "bird"]
    assert entry.manifest.provenance.licence == "proprietary"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_model(entry)(x), model(x), atol=1e-6)


def test_add_refuses_weights_that_do_not_fit_and_writes_nothing(run, tmp_path):
    _, weights, labels = _user_checkpoint(tmp_path)
    args = (
        "--architecture",
        "vit_tiny_patch16_224",
        "--input-size",
        "32x32",
        "--model-args",
        '{"img_size": 32, "patch_size": 8, "depth": 3, "num_classes": 3}',
    )
    result = run("models", "add", "--name", "pets", "--weights", weights, "--labels", labels, *args)
    assert result.exit_code == 1
    assert "weights do not fit" in result.output
    assert "nothing was registered" in result.output
    assert not (tmp_path / "data" / "models" / "pets").exists() or not any(
        (tmp_path / "data" / "models" / "pets").iterdir()
    )


def test_add_refuses_a_label_count_that_differs_from_the_head(run, tmp_path):
    _, weights, labels = _user_checkpoint(tmp_path)
    labels.write_text("cat\ndog\n")
    result = run("models", "add", "--name", "pets", "--weights", weights, "--labels", labels, *ADD_ARGS)
    assert result.exit_code == 1
    assert "3 classes but 2 labels" in result.output


def test_add_refuses_an_existing_version_unless_overwrite(run, tmp_path):
    _, weights, labels = _user_checkpoint(tmp_path)
    base = ("models", "add", "--name", "pets", "--weights", weights, "--labels", labels, *ADD_ARGS)
    assert run(*base).exit_code == 0
    again = run(*base)
    assert again.exit_code == 1
    assert "exists" in again.output
    assert run(*base, "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--input-size", "big"), "is not HEIGHTxWIDTH"),
        (("--mean", "a,b,c"), "not a comma-separated list"),
        (("--model-args", "{nope"), "not JSON"),
        (("--mean", "0.5"), "need 3 value"),
    ],
)
def test_add_bad_options_are_clear(run, tmp_path, extra, message):
    _, weights, labels = _user_checkpoint(tmp_path)
    result = run("models", "add", "--name", "pets", "--weights", weights, "--labels", labels, *ADD_ARGS, *extra)
    assert result.exit_code != 0
    assert message in result.output


def test_add_takes_the_path_as_an_argument_and_names_the_model_after_it(run, tmp_path):
    model, weights, labels = _user_checkpoint(tmp_path)
    spaced = weights.with_name("my pets.safetensors")
    weights.rename(spaced)
    result = run("models", "add", spaced, "--labels", labels, *ADD_ARGS)
    assert result.exit_code == 0, result.output
    assert "registered my-pets@1" in result.output
    assert "read: architecture vit_tiny_patch16_224 as given" in result.output
    entry = Catalog([tmp_path / "data" / "models"]).resolve("my-pets")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_model(entry)(x), model(x), atol=1e-6)


def test_add_needs_one_path(run, tmp_path):
    _, weights, labels = _user_checkpoint(tmp_path)
    both = run("models", "add", weights, "--weights", weights, "--labels", labels, *ADD_ARGS)
    assert both.exit_code == 2
    assert "not both" in both.output
    neither = run("models", "add", "--labels", labels, *ADD_ARGS)
    assert neither.exit_code == 2
    assert "give the PATH" in neither.output


def test_disable_list_and_enable_a_version(run, store_copy, monkeypatch):
    monkeypatch.setenv("CLASSLENS_MODEL_DIRS", str(store_copy))
    result = run("models", "disable", "fmnist-vit@1", "--note", "superseded")
    assert result.exit_code == 0
    assert "disabled fmnist-vit@1" in result.output
    assert "superseded" in (store_copy / "fmnist-vit" / "1" / "DISABLED").read_text()
    listed = run("models", "list").output
    assert "fmnist-vit@1 " not in listed
    assert "fmnist-vit@2" in listed
    assert "fmnist-vit@1 (disabled)" in run("models", "list", "--include-disabled").output
    rows = json.loads(run("models", "list", "--json", "--include-disabled").output)
    assert {(r["name"], r["version"]): r["disabled"] for r in rows}[("fmnist-vit", "1")] is True
    assert run("models", "show", "fmnist-vit@1").exit_code == 1  # not resolved for new work

    result = run("models", "enable", "fmnist-vit@1")
    assert result.exit_code == 0
    assert not (store_copy / "fmnist-vit" / "1" / "DISABLED").exists()
    assert "fmnist-vit@1 " in run("models", "list").output


def test_disable_needs_a_version(run):
    result = run("models", "disable", "fmnist-vit")
    assert result.exit_code == 1
    assert "names no version" in result.output


# A fresh interpreter in which torch, torchvision and timm cannot be imported, as where the worker extra is missing.
WITHOUT_TORCH = """
import sys


class NoWorkerExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoWorkerExtra())
from classlens.cli import main

main(prog_name="classlens")
"""


def test_add_without_the_worker_extra_is_a_clear_cli_error(tmp_path):
    weights = tmp_path / "user.safetensors"
    weights.write_bytes(b"not read: the command stops before")
    environment = {**os.environ, "CLASSLENS_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-c", WITHOUT_TORCH, "models", "add", str(weights), "--architecture", "vit_tiny"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Error: classlens models add" in result.stderr
    assert "pip install 'classlens[worker]'" in result.stderr
    assert "torch is not installed" in result.stderr
    assert not (tmp_path / "data" / "models").exists()


def test_export_onnx_without_the_worker_extra_is_a_clear_cli_error(tmp_path):
    environment = {**os.environ, "CLASSLENS_DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, "-c", WITHOUT_TORCH, "models", "export-onnx", "fmnist-vit"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Error: classlens models export-onnx" in result.stderr
    assert "pip install 'classlens[worker]'" in result.stderr
