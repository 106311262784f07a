"""`classlens explain` end to end on a small registered ViT: files written, clear errors."""

import json

import pytest
import timm
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from classlens.cli import main
from classlens.core import fashion_mnist
from classlens.core.contract import Explanation
from model_store.catalog import BUNDLED_SAMPLES

SAMPLES = sorted(BUNDLED_SAMPLES.glob("*.png"))
LABELS = list(fashion_mnist.LABELS)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A small random grey 28x28 ViT registered with `classlens models add` in its own data dir."""
    root = tmp_path_factory.mktemp("explain")
    arguments = {
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 10,
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
    }
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **arguments)
    save_file(model.state_dict(), str(root / "w.safetensors"))
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    environment = {"CLASSLENS_DATA_DIR": str(root / "data"), "CLASSLENS_MODEL_DIRS": ""}
    result = CliRunner().invoke(
        main,
        [
            "models",
            "add",
            "--name",
            "tiny-fm",
            "--architecture",
            "vit_tiny_patch16_224",
            "--model-args",
            json.dumps(arguments),
            "--weights",
            str(root / "w.safetensors"),
            "--labels",
            str(root / "labels.txt"),
            "--input-size",
            "28x28",
            "--colour-mode",
            "L",
            "--mean",
            "0.286",
            "--std",
            "0.353",
        ],
        env=environment,
    )
    assert result.exit_code == 0, result.output
    return root, environment


def run(registered, *args):
    _, environment = registered
    return CliRunner().invoke(main, ["explain", *map(str, args)], env=environment)


def test_explain_writes_json_and_figures(registered, tmp_path):
    out = tmp_path / "out"
    result = run(
        registered,
        *SAMPLES[:3],
        "--model",
        "tiny-fm",
        "--layer",
        "all",
        "--gradient-map",
        "--target",
        "bag",
        "--target",
        "0",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.splitlines()[0])
    assert len(printed) == 3
    document = Explanation.model_validate_json((out / f"{SAMPLES[0].stem}.json").read_text())
    assert [t.label for t in document.targets] == ["Bag", "T-shirt/top"]
    assert set(document.targets[0].projection_maps) == {"0", "1", "2"}
    for suffix in ("", "_layers", "_gradient"):
        figure = Image.open(out / f"{SAMPLES[0].stem}_8-Bag{suffix}.png")
        assert figure.mode == "RGB"
        assert min(figure.size) >= 224


def test_explain_writes_the_baseline_maps_asked_for(registered, tmp_path):
    arguments = ("--target", "bag", "--baseline-map", "rollout", "--baseline-map", "chefer", "--no-sublayers")
    result = run(registered, SAMPLES[0], "--model", "tiny-fm", "--out", tmp_path, *arguments)
    assert result.exit_code == 0, result.output
    document = Explanation.model_validate_json((tmp_path / f"{SAMPLES[0].stem}.json").read_text())
    maps = document.targets[0].baseline_maps
    assert maps is not None
    assert list(maps) == ["chefer", "rollout"]  # the canonical order, whatever the options' order
    assert len(maps["chefer"]) == 7
    for method in ("chefer", "rollout"):
        assert Image.open(tmp_path / f"{SAMPLES[0].stem}_8-Bag_{method}.png").mode == "RGB"
    assert not (tmp_path / f"{SAMPLES[0].stem}_8-Bag_gradcam.png").exists()


def test_targets_and_layers_are_read_as_the_api_reads_them(registered, tmp_path):
    arguments = ("--target", " 8 ", "--target", "ANKLE boot ", "--layer", " 2", "--layer", "0", "--layer", "2")
    result = run(registered, SAMPLES[0], "--model", "tiny-fm", "--out", tmp_path, "--no-sublayers", *arguments)
    assert result.exit_code == 0, result.output
    document = Explanation.model_validate_json((tmp_path / f"{SAMPLES[0].stem}.json").read_text())
    assert [t.index for t in document.targets] == [8, 9]
    assert list(document.targets[0].projection_maps) == ["0", "2"]


def test_explain_default_is_top3_at_the_last_layer(registered, tmp_path):
    result = run(registered, SAMPLES[0], "--model", "tiny-fm", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    document = Explanation.model_validate_json((tmp_path / f"{SAMPLES[0].stem}.json").read_text())
    assert len(document.targets) == 3
    assert list(document.targets[0].projection_maps) == ["2"]
    assert document.targets[0].rank == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--target", "Bagg"), "unknown class 'Bagg'; did you mean 'Bag'?"),
        (("--layer", "3"), "layer 3 is out of range: layers are 0 (embedding) to 2"),
        (("--layer", "last"), "'last' is not a layer number or 'all'"),
        (("--layer", "²"), "'²' is not a layer number or 'all'"),
        (("--layer", "-1"), "layer -1 is out of range: layers are 0 (embedding) to 2"),
        (("--target", "²"), "unknown class '²'"),
        (("--target", "1", "--target", " trouser "), "targets repeat a class"),
        (("--top-k", "0"), "top_k: Input should be greater than or equal to 1"),
    ],
)
def test_bad_requests_are_clear_errors_not_tracebacks(registered, tmp_path, arguments, message):
    result = run(registered, SAMPLES[0], "--model", "tiny-fm", "--out", tmp_path, *arguments)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_unreadable_images_are_skipped_and_reported(registered, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(SAMPLES[0].read_bytes()[:40])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = run(registered, broken, text, SAMPLES[0], "--model", "tiny-fm", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert f"skipped {broken}" in result.output
    assert f"skipped {text}" in result.output
    assert "2 image(s) could not be read" in result.output
    assert (tmp_path / "out" / f"{SAMPLES[0].stem}.json").exists()


def test_a_cnn_is_refused_with_the_reason(registered, tmp_path):
    result = run(registered, SAMPLES[0], "--model", "fmnist-resnet", "--out", tmp_path)
    assert result.exit_code == 1
    assert "not a timm VisionTransformer" in result.output
