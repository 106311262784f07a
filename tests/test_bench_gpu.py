"""The GPU run's CPU side: the same code at toy size on the CPU, and a clear refusal without CUDA."""

import json

import pytest
import torch

from classlens.bench import gpu


def test_the_rehearsal_on_cpu_writes_every_precision_with_tolerance_and_checks(tmp_path):
    out = tmp_path / "gpu.json"
    arguments = ["--device", "cpu", "--architecture", "vit_tiny_patch16_224", "--img-size", "32"]
    code = gpu.main([*arguments, "--batch", "2", "--repeats", "1", "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    [check] = record["checks"]
    assert check["passed"]
    assert check["figures"]["max_logit_map_difference"] == 0.0  # CPU against CPU: the same numbers
    rows = record["throughput"]
    assert [(row["batch"], row["precision"]) for row in rows] == [(2, precision) for precision in gpu.PRECISIONS]
    for row in rows:
        assert row["inference_images_per_s"] > 0
        assert row["explain_to_inference"] == pytest.approx(
            row["explain_images_per_s"] / row["inference_images_per_s"], rel=0.01
        )
        assert ("tolerance" in row) == (row["precision"] != "float32")
    half = next(row for row in rows if row["precision"] == "float16")["tolerance"]
    assert 0 < half["max_logit_map_difference"] < 0.1 * half["largest_logit_map_value"]
    assert record["goal"]["wanted"] == gpu.THROUGHPUT_GOAL
    assert isinstance(record["goal"]["met"], bool)


def test_without_cuda_the_gpu_run_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "gpu.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()
