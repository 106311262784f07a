"""The GPU path: device choice, one worker per GPU, and what half precision costs.

This machine has no GPU, so nothing here runs CUDA. What can be checked without one is:
the device setting and its error, the GPU count read without initialising CUDA, the
per-GPU worker plan and what ``classlens worker --gpus`` would start, and the tolerance
of the half-precision forward pass, measured with CPU kernels (docs/gpu.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import classlens.cli.gpu_workers as gpu_workers
from classlens.cli import main
from classlens.cli.gpu_workers import parse_nvidia_smi, visible_gpus, worker_plan
from classlens.core.contract import ExplainRequest
from model_store.catalog import BUNDLED_SAMPLES, Catalog
from worker import runtime
from worker.devices import DeviceError, resolve_device
from worker.lens.projection import ClassProjection
from worker.lens.vit import trace
from worker.runtime import ModelCache, forward_dtype, load

CPU = torch.device("cpu")
SAMPLES = BUNDLED_SAMPLES

TWO_GPUS = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1b7e0c3a-aaaa-bbbb-cccc-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1b7e0c3a-aaaa-bbbb-cccc-000000000001)
"""

MIG_ON_GPU_0 = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d0a1f6e-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  0: (UUID: MIG-0e6a7d1c-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  1: (UUID: MIG-0e6a7d1c-aaaa-bbbb-cccc-000000000001)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-5d0a1f6e-aaaa-bbbb-cccc-000000000001)
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put an ``nvidia-smi`` that prints a given listing (or fails) first on PATH; no CUDA_VISIBLE_DEVICES."""

    def install(listing: str, status: int = 0) -> Path:
        folder = tmp_path / "bin"
        folder.mkdir(exist_ok=True)
        (folder / "listing.txt").write_text(listing)
        script = folder / "nvidia-smi"
        script.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 2\ncat "{folder / "listing.txt"}"\nexit {status}\n')
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        return script

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return install


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees no GPU, whatever machine runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda_tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks torch about CUDA (which initialises the driver in this process)."""

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("CUDA was touched in the workers' parent")

    for name in ("is_available", "device_count", "init", "_lazy_init", "current_device"):
        monkeypatch.setattr(torch.cuda, name, touched)


# --- resolve_device ---------------------------------------------------------------------------


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_resolve_device_auto_without_gpu_is_cpu(no_cuda: None) -> None:
    assert resolve_device("auto") == CPU


def test_device_cuda_without_gpu_fails_with_a_clear_message(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert message.startswith("CLASSLENS_DEVICE=cuda but ")
    assert "CUDA_VISIBLE_DEVICES=''" in message
    assert "CLASSLENS_DEVICE=auto or cpu" in message


def test_model_cache_resolves_its_device_at_the_first_load(no_cuda: None, bundled_catalog: Catalog) -> None:
    cache = ModelCache(bundled_catalog, "cuda")  # building it touches no device
    with pytest.raises(DeviceError, match="CLASSLENS_DEVICE=cuda"):
        cache.get("fmnist-vit")
    assert ModelCache(bundled_catalog, "auto").get("fmnist-vit").device == CPU


def test_worker_with_device_cuda_fails_before_starting_celery(
    no_cuda: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: --gpus all finds none, runs one worker here
    env = {"CLASSLENS_DEVICE": "cuda", "CLASSLENS_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(main, ["worker", "--gpus", "all"], env=env)
    assert result.exit_code == 1, result.output
    assert "Error: CLASSLENS_DEVICE=cuda but" in result.output
    assert not (tmp_path / "data").exists()  # no broker or store was opened


# --- visible_gpus -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,1", ["0", "1"]),
        (" 1, 0 ", ["1", "0"]),
        ("", []),
        ("-1", []),
        ("0,-1,2", ["0"]),  # CUDA stops at the first invalid entry
        ("GPU-1b7e0c3a,MIG-0e6a7d1c", ["GPU-1b7e0c3a", "MIG-0e6a7d1c"]),
    ],
)
def test_visible_gpus_honours_cuda_visible_devices(value: str, expected: list[str], fake_nvidia_smi) -> None:
    fake_nvidia_smi(TWO_GPUS)  # present, but CUDA_VISIBLE_DEVICES wins
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == expected


def test_visible_gpus_from_nvidia_smi(fake_nvidia_smi) -> None:
    fake_nvidia_smi(TWO_GPUS)
    assert visible_gpus() == ["0", "1"]


def test_visible_gpus_lists_mig_instances_in_place_of_their_gpu(fake_nvidia_smi) -> None:
    fake_nvidia_smi(MIG_ON_GPU_0)
    assert visible_gpus() == [
        "MIG-0e6a7d1c-aaaa-bbbb-cccc-000000000000",
        "MIG-0e6a7d1c-aaaa-bbbb-cccc-000000000001",
        "1",
    ]


def test_visible_gpus_when_nvidia_smi_fails(fake_nvidia_smi, caplog: pytest.LogCaptureFixture) -> None:
    fake_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", status=9)
    with caplog.at_level(logging.WARNING, logger=gpu_workers.__name__):
        assert visible_gpus() == []
    assert "nvidia-smi -L failed" in caplog.text


def test_visible_gpus_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus({}) == []


def test_parse_nvidia_smi_ignores_other_lines() -> None:
    assert parse_nvidia_smi("No devices were found\n") == []
    assert parse_nvidia_smi("GPU x: odd\n" + TWO_GPUS) == ["0", "1"]


def test_counting_gpus_touches_no_cuda(fake_nvidia_smi, cuda_tripwire: None) -> None:
    fake_nvidia_smi(TWO_GPUS)
    assert worker_plan(visible_gpus(), {})
    assert not torch.cuda.is_initialized()


# --- worker_plan --------------------------------------------------------------------------------


def test_worker_plan_one_environment_per_gpu() -> None:
    base = {"PATH": "/usr/bin", "CLASSLENS_PRECISION": "float16", "CLASSLENS_DEVICE": "auto"}
    plan = worker_plan(["0", "1"], base)
    assert plan == [
        {"PATH": "/usr/bin", "CLASSLENS_PRECISION": "float16", "CLASSLENS_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0"},
        {"PATH": "/usr/bin", "CLASSLENS_PRECISION": "float16", "CLASSLENS_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "1"},
    ]
    assert base["CLASSLENS_DEVICE"] == "auto"  # not modified


def test_worker_plan_without_gpus_is_one_cpu_worker() -> None:
    assert worker_plan([], {"PATH": "/usr/bin"}) == [{"PATH": "/usr/bin", "CLASSLENS_DEVICE": "cpu"}]
    # Asked for CUDA, it stays asked for, so that the worker fails with DeviceError's message.
    assert worker_plan([], {"CLASSLENS_DEVICE": "cuda"}) == [{"CLASSLENS_DEVICE": "cuda"}]


# --- classlens worker --gpus --------------------------------------------------------------------


class FinishedProcess:
    """Stands in for a started worker that has already exited with ``status``."""

    def __init__(self, status: int = 0):
        self.pid = 4242
        self.status = status

    def poll(self) -> int:
        return self.status


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str]]]:
    """What ``classlens worker --gpus`` starts, recorded instead of started."""
    calls: list[tuple[list[str], dict[str, str]]] = []

    def record(command: list[str], env: dict[str, str]) -> FinishedProcess:
        calls.append((command, env))
        return FinishedProcess()

    monkeypatch.setattr(gpu_workers, "_start_child", record)
    return calls


def test_worker_gpus_all_starts_one_solo_worker_per_gpu(
    started: list[tuple[list[str], dict[str, str]]], cuda_tripwire: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    result = CliRunner().invoke(main, ["worker", "--gpus", "all", "--queues", "gpu", "--loglevel", "WARNING"])
    assert result.exit_code == 0, result.output
    assert "2 GPU(s) (0, 1): starting one worker per GPU" in result.output
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1"]
    assert all(env["CLASSLENS_DEVICE"] == "cuda" for _, env in started)
    for index, (command, _) in enumerate(started):
        assert command == [
            sys.executable,
            "-m",
            "classlens.cli",
            "worker",
            "--gpus=0",
            "--queues=gpu",
            "--concurrency=1",
            "--pool=solo",
            "--loglevel=WARNING",
            f"--hostname=classlens-gpu{index}@%h",
        ]
    assert not torch.cuda.is_initialized()


def test_worker_gpus_count_takes_the_first_gpus_from_nvidia_smi(
    started: list[tuple[list[str], dict[str, str]]], fake_nvidia_smi, cuda_tripwire: None
) -> None:
    fake_nvidia_smi(TWO_GPUS)
    result = CliRunner().invoke(main, ["worker", "--gpus", "1"])
    assert result.exit_code == 0, result.output
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0"]
    assert not torch.cuda.is_initialized()


def test_worker_gpus_more_than_visible_is_an_error(
    started: list[tuple[list[str], dict[str, str]]], fake_nvidia_smi
) -> None:
    fake_nvidia_smi(TWO_GPUS)
    result = CliRunner().invoke(main, ["worker", "--gpus", "3"])
    assert result.exit_code == 2
    assert "--gpus 3: only 2 GPU(s) visible (0, 1)" in result.output
    assert started == []


def test_worker_gpus_rejects_other_values() -> None:
    result = CliRunner().invoke(main, ["worker", "--gpus", "some"])
    assert result.exit_code == 2
    assert "expected 'all' or a number of GPUs" in result.output


def test_gpu_plan_without_gpus_runs_one_worker_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpu_workers.gpu_plan(None, {}) == []
    assert gpu_workers.gpu_plan(0, {"CUDA_VISIBLE_DEVICES": "0,1"}) == []  # --gpus 0: as configured


def test_the_supervisor_exits_with_the_first_worker_and_stops_the_others() -> None:
    python = sys.executable
    children = [
        subprocess.Popen([python, "-c", "import time; time.sleep(60)"]),
        subprocess.Popen([python, "-c", "import sys, time; time.sleep(0.3); sys.exit(3)"]),
    ]
    try:
        assert gpu_workers.supervise(children, poll_s=0.05) == 3
        assert children[0].poll() is not None  # stopped, not left running
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_workers_started_before_a_failed_start_are_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    running: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if running:
            raise OSError("cannot start the second worker")
        running.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return running[0]

    monkeypatch.setattr(gpu_workers, "_start_child", start)
    plan = worker_plan(["0", "1"], {})
    with pytest.raises(OSError, match="second worker"):
        gpu_workers.run_gpu_workers(plan, "gpu", "INFO")
    assert running[0].poll() is not None


# --- half precision -----------------------------------------------------------------------------


def test_half_precision_is_ignored_on_cpu(bundled_catalog: Catalog, caplog: pytest.LogCaptureFixture) -> None:
    assert forward_dtype("float32", torch.device("cuda")) is None
    assert forward_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert forward_dtype("float16", CPU, half_on_cpu=True) == torch.float16
    runtime._log_ignored_precision.cache_clear()
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        cache = ModelCache(bundled_catalog, CPU, onnx="off", precision="float16")
        assert cache.get("fmnist-vit").half is None
        assert getattr(cache.get("fmnist-resnet", require_vit=False), "half", None) is None  # a CNN: no lens, no half
        forward_dtype("float16", CPU)
    ignored = [record for record in caplog.records if "precision float16 ignored on cpu" in record.message]
    assert len(ignored) == 1  # once per process, not once per model
    assert "slower there than float32" in ignored[0].message


def test_a_cnn_gets_no_half_copy(bundled_catalog: Catalog) -> None:
    cnn = load(bundled_catalog.resolve("fmnist-resnet"), CPU, require_vit=False, precision="float16", half_on_cpu=True)
    assert getattr(cnn, "half", None) is None  # a LoadedModel, not a LoadedViT: nothing to explain


# Measured on this machine's CPU kernels (torch 2.13.0, the 20 bundled Fashion-MNIST samples,
# fmnist-vit@2); docs/gpu.md states them. (top-1 agreement, max |logit map difference|, share of
# token ranks that change, max |output logit difference|) with bounds a little above the figures.
#   float16:  20/20, 0.0167, 0.23 %, 0.0036
#   bfloat16: 20/20, 0.108,  1.5 %,  0.053
# One sample's float32 top-2 logits are 0.0074 apart, less than bfloat16's logit error, so a
# bfloat16 top-1 flip is possible on other kernels: its bound allows one image in 20.
TOLERANCE = {
    "float16": {"top1": 1.0, "map": 0.03, "ranks": 0.005, "logits": 0.01},
    "bfloat16": {"top1": 0.95, "map": 0.2, "ranks": 0.03, "logits": 0.1},
}


@pytest.fixture(scope="module")
def fmnist_images() -> list[Image.Image]:
    images = [Image.open(path) for path in sorted(SAMPLES.glob("*.png"))]
    assert len(images) == 20
    return images


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_half_precision_tolerance_on_cpu_kernels(
    precision: str, bundled_catalog: Catalog, fmnist_images: list[Image.Image]
) -> None:
    entry = bundled_catalog.resolve("fmnist-vit")
    full = load(entry, CPU, onnx="off")
    half = load(entry, CPU, onnx="off", precision=precision, half_on_cpu=True)  # type: ignore[arg-type]
    assert half.half is not None
    assert full.half is None
    bound = TOLERANCE[precision]

    # The streams: every class's rank at every token of every stream (x_b, a_b, m_b).
    images = full.preprocess(fmnist_images)
    exact, rounded = trace(full.network, images), half.half(images, True)
    assert rounded.residual.dtype == torch.float32
    projection = ClassProjection(full.network)
    classes = torch.arange(len(full.labels)).expand(len(images), -1)
    exact_ranks = projection.of_trace(exact).ranks(classes)
    rounded_ranks = projection.of_trace(rounded).ranks(classes)
    changed = (exact_ranks != rounded_ranks).double().mean().item()
    logits = (exact.logits - rounded.logits).abs().max().item()
    top1 = (exact.logits.argmax(-1) == rounded.logits.argmax(-1)).double().mean().item()

    # The maps, through LoadedModel.explain (the half forward, then the float32 projection).
    request = ExplainRequest(map_kind="logit", layers=list(range(7)), targets=list(range(len(full.labels))))
    difference = 0.0
    for a, b in zip(full.explain(fmnist_images, request), half.explain(fmnist_images, request), strict=True):
        assert a.prediction[0].index == b.prediction[0].index or top1 < 1
        for ta, tb in zip(a.targets, b.targets, strict=True):
            for layer, values in ta.projection_maps.items():
                gap = np.abs(np.array(values) - np.array(tb.projection_maps[layer])).max()
                difference = max(difference, float(gap))

    print(f"{precision}: top-1 {top1:.3f}, map {difference:.4f}, ranks changed {changed:.4%}, logits {logits:.4f}")
    assert top1 >= bound["top1"]
    assert 0 < difference <= bound["map"]  # above 0: the half forward was used
    assert 0 < changed <= bound["ranks"]
    assert 0 < logits <= bound["logits"]
