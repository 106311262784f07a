"""`classlens analyze` end to end on the bundled models (few images), and its clear errors."""

import json

import pytest
from click.testing import CliRunner

from classlens.cli import main
from classlens.cli.analyze import figure_file, parse_region
from classlens.core.contract import AnalysisResult
from model_store.catalog import BUNDLED_SAMPLES

SAMPLES = sorted(BUNDLED_SAMPLES.glob("*.png"))
ENV = {"CLASSLENS_MODEL_DIRS": ""}


def analyze(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)], env=ENV)


def test_cka_across_a_vit_and_the_cnn_writes_json_and_figures(tmp_path):
    result = analyze(
        "cka",
        "--model",
        "fmnist-vit@1",
        "--compare-to",
        "fmnist-resnet@1",
        "--images",
        8,
        "--batch-size",
        4,
        "--representation",
        "gap",
        "--out",
        tmp_path,
        "--json",
    )
    assert result.exit_code == 0, result.output
    stored = AnalysisResult.model_validate_json((tmp_path / "cka.json").read_text())
    assert [m.name for m in stored.models] == ["fmnist-vit", "fmnist-resnet"]
    assert stored.images == 8
    assert stored.data["representation"] == "gap"
    assert len(stored.data["matrix"]) == 6
    png = (tmp_path / "cka.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["figures"]["cka"] == stored.figures["cka"]


def test_image_files_and_compare_report(tmp_path):
    result = analyze(
        "compare",
        *SAMPLES[:8],
        "--model",
        "fmnist-vit@1",
        "--compare-to",
        "fmnist-vit-10pct@1",
        "--batch-size",
        4,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "compare_report.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "compare_cka.png").exists()
    assert (tmp_path / "compare.json").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["probes", SAMPLES[0], SAMPLES[1], SAMPLES[2], SAMPLES[3], "--model", "fmnist-vit@1"],
            1,
            "probes need labels",
        ),
        (["attention-distance", "--model", "fmnist-resnet@1", "--images", 8], 1, "needs a Vision Transformer"),
        (["compare", "--model", "fmnist-vit@1", "--images", 8], 2, "--compare-to"),
        (["perturb", "--model", "fmnist-vit@1", "--images", 8, "--region", "1,2,x,4"], 2, "four grid indices"),
        (["perturb", "--model", "fmnist-vit@1", "--images", 8, "--region", "0,0,9,9"], 1, "not a box"),
        (["cka", "--model", "fmnist-vit@1", "--images", 8, "--batch-size", 2], 2, "--batch-size"),
        (["cka", "--model", "fmnist-vit@1", "--images", 3], 2, "--images"),
        (["cka", "--model", "no-such-model", "--images", 8], 1, "no-such-model"),
        (["cka", SAMPLES[0], "--model", "fmnist-vit@1", "--images", 8], 2, "not both"),
        (["skip-ratio", SAMPLES[0], "--model", "fmnist-vit@1"], 1, "at least 4"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, code, message):
    result = analyze(*args, "--out", tmp_path)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_helpers():
    assert parse_region("1, 2,3,4") == (1, 2, 3, 4)
    assert parse_region(None) is None
    assert figure_file("cka", "cka") == "cka.png"
    assert figure_file("attention-distance", "attention_distance") == "attention_distance.png"
    assert figure_file("memories", "memories_agreement") == "memories_agreement.png"
    assert figure_file("compare", "report") == "compare_report.html"
    assert figure_file("compare", "probes_a") == "compare_probes_a.png"
