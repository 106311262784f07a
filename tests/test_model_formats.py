"""`classlens models add PATH` for every format people have, then `classlens explain` on what it registered.

Every checkpoint here is written by the libraries' own save functions (timm's ``save_for_hf``
and ``CheckpointSaver``, transformers' ``save_pretrained``, ``torch.save``, safetensors) from
randomly initialised small models: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import resolve_input_data_config
from timm.models import save_for_hf

import worker  # noqa: F401  (torchvision compatibility before timm)
from classlens.core.contract import Explanation
from model_store.catalog import Catalog
from model_store.manifest import ManifestError
from model_store.preprocessing import from_timm_config
from model_store.sources import ModelSources, RegisterOptions
from tests.checkpoints import ARCH, LABELS, TINY, hf_config, tiny_vit, train_checkpoint
from worker.model_loader import load_model, logits_of
from worker.registration import RegistrationError, register

# A paragraph, not a key dump: the longest message a mismatch may give (the CLI adds a line).
SHORT = 1500


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "data" / "models"


@pytest.fixture
def labels_file(tmp_path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


@pytest.fixture
def photo(tmp_path) -> Path:
    """A non-square picture (48 wide, 30 high), so that the resize and crop really do something."""
    torch.manual_seed(1)
    pixels = (torch.rand(30, 48, 3) * 255).to(torch.uint8).numpy()
    path = tmp_path / "photo.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def registered(cli, store, *args) -> Catalog:
    result = cli("models", "add", *args)
    assert result.exit_code == 0, result.output
    assert "registered " in result.output
    assert "read: " in result.output
    return Catalog([store])


def explained(cli, tmp_path, photo, name) -> Explanation:
    out = tmp_path / f"out-{name}"
    result = cli("explain", photo, "--model", name, "--top-k", "2", "--out", out)
    assert result.exit_code == 0, result.output
    explanation = Explanation.model_validate_json((out / "photo.json").read_text())
    assert len(explanation.targets) == 2
    return explanation


def same_logits(entry, model, channels=3, size=32) -> None:
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert torch.allclose(logits_of(load_model(entry)(x)), logits_of(model(x)), atol=1e-5)


def store_is_empty(store: Path) -> bool:
    return not store.exists() or not any(store.iterdir())


# -- timm hub folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_timm_hub_folder_in_one_command(cli, store, tmp_path, photo, safe):
    model = tiny_vit()
    folder = tmp_path / "pets-hub"
    save_for_hf(model, folder, model_config={"label_names": LABELS}, safe_serialization=safe)
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()

    entry = registered(cli, store, folder).resolve("pets-hub")
    manifest = entry.manifest
    assert manifest.framework == "timm"
    assert manifest.architecture == ARCH
    assert manifest.model_args["depth"] == 2
    assert manifest.model_args["num_classes"] == 3
    assert entry.labels() == LABELS
    assert (manifest.input.height, manifest.input.width, manifest.input.colour_mode) == (32, 32, "RGB")
    assert manifest.preprocessing.source["crop_pct"] == 0.9
    assert manifest.preprocessing.crop == (32, 32)
    assert manifest.structure is not None
    assert manifest.structure.family == "timm-vit"
    assert manifest.structure.grid == (4, 4)
    assert manifest.structure.layers == 2
    assert manifest.weights.format == "safetensors"
    assert "config.json" in manifest.provenance.notes
    same_logits(entry, model)
    explanation = explained(cli, tmp_path, photo, "pets-hub")
    assert {t.label for t in explanation.targets} <= set(LABELS)


def test_timm_eva_hub_folder(cli, store, tmp_path, photo):
    torch.manual_seed(0)
    eva = timm.create_model(
        "eva02_tiny_patch14_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        depth=2,
        embed_dim=64,
        num_heads=2,
        num_classes=3,
    ).eval()
    folder = tmp_path / "eva"
    save_for_hf(eva, folder, model_config={"label_names": LABELS}, safe_serialization=True)
    entry = registered(cli, store, folder).resolve("eva")
    assert entry.manifest.structure is not None
    assert entry.manifest.structure.family == "timm-eva"
    same_logits(entry, eva, size=28)
    explained(cli, tmp_path, photo, "eva")


def test_hub_folder_overrides(cli, store, tmp_path):
    folder = tmp_path / "hub"
    save_for_hf(tiny_vit(), folder, model_config={"label_names": LABELS}, safe_serialization=True)
    entry = registered(
        cli, store, folder, "--name", "over", "--crop-pct", "1.0", "--interpolation", "bilinear", "--mean", "0,0,0"
    ).resolve("over")
    steps = entry.manifest.preprocessing
    assert steps.source["crop_pct"] == 1.0
    assert steps.interpolation == "bilinear"
    assert steps.mean == (0.0, 0.0, 0.0)
    assert "overridden: crop_pct, interpolation, mean" in entry.manifest.provenance.notes

    exact = registered(cli, store, folder, "--name", "exact", "--resize", "40x40", "--crop", "32x32")
    steps = exact.resolve("exact").manifest.preprocessing
    assert (steps.resize, steps.resize_mode, steps.crop) == ((40, 40), "exact", (32, 32))


def test_preprocessing_that_cannot_be_stated_is_refused_unless_overridden(cli, store, tmp_path):
    folder = tmp_path / "rand"
    save_for_hf(tiny_vit(), folder, model_config={"label_names": LABELS}, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["interpolation"] = "random"  # a training-time choice: no fixed eval transform
    (folder / "config.json").write_text(json.dumps(config))
    output = refused(cli, store, folder)
    assert "the preprocessing cannot be stated" in output
    assert "'random'" in output
    entry = registered(cli, store, folder, "--interpolation", "bicubic").resolve("rand")
    assert entry.manifest.preprocessing.interpolation == "bicubic"


# -- plain state dicts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_plain_state_dict_with_an_architecture(cli, store, tmp_path, photo, labels_file, suffix):
    model = tiny_vit()
    weights = tmp_path / f"pets{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(weights))
    else:
        torch.save(model.state_dict(), weights)
    catalog = registered(
        cli, store, weights, "--architecture", ARCH, "--model-args", json.dumps(TINY), "--labels", labels_file
    )
    entry = catalog.resolve("pets")
    assert entry.manifest.model_args["num_classes"] == 3  # from the labels
    assert entry.labels() == LABELS
    # No preprocessing given: timm's own eval transform of the architecture, at the size it was built for.
    assert entry.manifest.preprocessing == from_timm_config(resolve_input_data_config(model))
    assert entry.manifest.weights.format == "safetensors"
    same_logits(entry, model)
    explained(cli, tmp_path, photo, "pets")


def test_labels_default_from_the_head_with_a_warning(cli, store, tmp_path):
    weights = tmp_path / "five.safetensors"
    save_file(tiny_vit(num_classes=5).state_dict(), str(weights))
    result = cli("models", "add", weights, "--architecture", ARCH, "--model-args", json.dumps(TINY))
    assert result.exit_code == 0, result.output
    assert "warning: nothing names the 5 classes" in result.output
    entry = Catalog([store]).resolve("five")
    assert entry.labels() == [f"class_{i}" for i in range(5)]
    assert entry.manifest.model_args["num_classes"] == 5  # from head.weight's rows


def test_ddp_module_prefix_is_removed(cli, store, tmp_path, photo, labels_file):
    model = tiny_vit()
    wrapped = torch.nn.DataParallel(model)
    assert all(key.startswith("module.") for key in wrapped.state_dict())
    weights = tmp_path / "ddp.pth"
    torch.save({"state_dict": wrapped.state_dict()}, weights)
    entry = registered(
        cli, store, weights, "--architecture", ARCH, "--model-args", json.dumps(TINY), "--labels", labels_file
    ).resolve("ddp")
    details = entry.manifest.weights.details
    assert details["removed_prefix"] == "module."
    assert details["source_file"] == "ddp.pth"
    assert not any(key.startswith("module.") for key in load_file(str(entry.artifact_path())))
    same_logits(entry, model)
    explained(cli, tmp_path, photo, "ddp")


# -- timm train.py checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [False, True], ids=["state_dict", "state_dict_ema"])
def test_train_checkpoint_in_one_command(cli, store, tmp_path, photo, ema):
    model, model_ema, checkpoint = train_checkpoint(tmp_path / "run")
    catalog = registered(cli, store, checkpoint, "--name", "trained", *(["--ema"] if ema else []))
    entry = catalog.resolve("trained")
    manifest = entry.manifest
    assert manifest.architecture == ARCH  # from args.model
    assert manifest.model_args["num_classes"] == 4
    assert manifest.model_args["depth"] == 2
    assert manifest.model_args["img_size"] == 32
    assert manifest.weights.details["source_entry"] == ("state_dict_ema" if ema else "state_dict")
    assert "epoch 3" in manifest.provenance.recipe
    same_logits(entry, model_ema if ema else model)
    explained(cli, tmp_path, photo, "trained")


def test_train_checkpoint_renamed_still_registers(cli, store, tmp_path):
    model, _, checkpoint = train_checkpoint(tmp_path / "run", ema=False)
    renamed = tmp_path / "best.pth"
    shutil.copyfile(checkpoint, renamed)
    same_logits(registered(cli, store, renamed).resolve("best"), model)


def test_ema_without_ema_weights_is_refused(cli, store, tmp_path):
    _, _, checkpoint = train_checkpoint(tmp_path / "run", ema=False)
    result = cli("models", "add", checkpoint, "--ema")
    assert result.exit_code == 1
    assert "no state_dict_ema" in result.output
    assert "nothing was registered" in result.output
    assert store_is_empty(store)


# -- transformers folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_transformers_vit_folder(cli, store, tmp_path, photo, weights_file):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = hf_config(ViTConfig, id2label=dict(enumerate(LABELS)), label2id={v: k for k, v in enumerate(LABELS)})
    model = ViTForImageClassification(config).eval()
    folder = tmp_path / "hf-vit"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    if weights_file == "pytorch_model.bin":
        # transformers 5 saves safetensors only; older versions wrote this pickle of the same tensors.
        torch.save(load_file(str(folder / "model.safetensors")), folder / weights_file)
        (folder / "model.safetensors").unlink()

    entry = registered(cli, store, folder).resolve("hf-vit")
    manifest = entry.manifest
    assert manifest.framework == "transformers"
    assert manifest.architecture == "ViTForImageClassification"
    assert manifest.model_args["num_labels"] == 3
    assert "id2label" not in manifest.model_args
    assert manifest.model_args["model_type"] == "vit"
    assert entry.labels() == LABELS
    assert manifest.preprocessing.resize == (32, 32)
    assert manifest.preprocessing.interpolation == "bilinear"
    assert "preprocessor_config.json" in manifest.provenance.notes
    same_logits(entry, model)
    loaded: Any = load_model(entry)
    assert loaded.config._attn_implementation == "eager"  # attention probabilities can be read
    assert manifest.structure is not None
    assert manifest.structure.layers == 2
    explained(cli, tmp_path, photo, "hf-vit")


@pytest.mark.parametrize("teacher", [False, True], ids=["deit", "deit-with-teacher"])
def test_transformers_deit_folder(cli, store, tmp_path, photo, teacher):
    from transformers import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    model_class = DeiTForImageClassificationWithTeacher if teacher else DeiTForImageClassification
    model = model_class(hf_config(DeiTConfig, num_labels=4)).eval()
    folder = tmp_path / "hf-deit"
    model.save_pretrained(folder)  # no image processor saved, labels LABEL_0 ...: nobody named them

    result = cli("models", "add", folder)
    assert result.exit_code == 0, result.output
    assert "no preprocessor_config.json" in result.output
    assert "nothing names the 4 classes" in result.output
    entry = Catalog([store]).resolve("hf-deit")
    assert entry.manifest.architecture == model_class.__name__
    assert entry.labels() == [f"class_{i}" for i in range(4)]
    same_logits(entry, model)
    assert entry.manifest.structure is not None
    assert entry.manifest.structure.prefix_tokens == ("cls", "dist")
    explained(cli, tmp_path, photo, "hf-deit")


def test_unsupported_transformers_class_is_refused_naming_the_supported(cli, store, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "other"
    ViTForImageClassification(hf_config(ViTConfig, num_labels=3)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BeitForImageClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("models", "add", folder)
    assert result.exit_code == 1
    assert "BeitForImageClassification is not supported" in result.output
    assert "ViTForImageClassification, DeiTForImageClassification" in result.output
    assert store_is_empty(store)


# -- what does not fit: one paragraph, nothing stored ----------------------------------------------------


def refused(cli, store, *args) -> str:
    result = cli("models", "add", *args)
    assert result.exit_code == 1, result.output
    assert "nothing was registered" in result.output
    assert "Traceback" not in result.output
    assert len(result.output) < SHORT, result.output
    assert store_is_empty(store)
    return result.output


def test_width_mismatch_names_the_size_meant(cli, store, tmp_path):
    torch.manual_seed(0)
    small = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3
    )
    weights = tmp_path / "small.safetensors"
    save_file(small.state_dict(), str(weights))
    args = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2})
    output = refused(cli, store, weights, "--architecture", "vit_base_patch16_224", "--model-args", args)
    assert "weights do not fit vit_base_patch16_224" in output
    assert "embed_dim 384 in the checkpoint vs 768 in vit_base_patch16_224: did you mean vit_small_patch16_224?" in (
        output.replace("\n", " ")
    )
    assert "shape mismatches" in output


def test_width_mismatch_of_a_model_without_a_cls_token(cli, store, tmp_path):
    """GAP models have no CLS token: the width is read from the position embedding."""
    torch.manual_seed(0)
    gap = {"img_size": 32, "patch_size": 8, "depth": 2, "class_token": False, "global_pool": "avg"}
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **gap)
    weights = tmp_path / "tiny-gap.safetensors"
    save_file(tiny.state_dict(), str(weights))
    output = refused(cli, store, weights, "--architecture", "vit_small_patch16_224", "--model-args", json.dumps(gap))
    assert "embed_dim 192 in the checkpoint vs 384 in vit_small_patch16_224: did you mean vit_tiny_patch16_224?" in (
        output.replace("\n", " ")
    )


def test_depth_mismatch(cli, store, tmp_path):
    weights = tmp_path / "two.safetensors"
    save_file(tiny_vit().state_dict(), str(weights))
    output = refused(cli, store, weights, "--architecture", ARCH, "--model-args", json.dumps({**TINY, "depth": 4}))
    assert "missing keys" in output
    assert "the checkpoint has 2 blocks, the model 4: set depth to 2" in output


def test_transformers_keys_under_a_timm_name(cli, store, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    weights = tmp_path / "hf.safetensors"
    save_file(ViTForImageClassification(hf_config(ViTConfig, num_labels=3)).state_dict(), str(weights))
    output = refused(cli, store, weights, "--architecture", ARCH, "--model-args", json.dumps(TINY))
    assert "these keys look like a Hugging Face transformers checkpoint" in output.replace("\n", " ")


def test_head_classes_differ_from_the_labels(cli, store, tmp_path, labels_file):
    weights = tmp_path / "ten.pth"
    torch.save(tiny_vit(num_classes=10).state_dict(), weights)
    output = refused(
        cli, store, weights, "--architecture", ARCH, "--model-args", json.dumps(TINY), "--labels", labels_file
    )
    assert "the checkpoint's head (head.weight) has 10 classes but 3 labels were given" in output.replace("\n", " ")


def test_pickled_objects_are_never_unpickled(cli, store, tmp_path):
    weights = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_vit().state_dict(), "extra": Path("x")}, weights)
    output = refused(cli, store, weights, "--architecture", ARCH)
    assert "refused to unpickle" in output
    assert "weights_only=True" in output


def test_a_vit_configuration_the_lens_refuses_needs_analyses_only(cli, store, tmp_path):
    folder = tmp_path / "mapvit"
    save_for_hf(tiny_vit(global_pool="map"), folder, model_config={"label_names": LABELS}, safe_serialization=True)
    output = refused(cli, store, folder)
    assert "the class-embedding lens cannot open vit_tiny_patch16_224" in output.replace("\n", " ")
    assert "global_pool 'map'" in output
    assert "analyses-only" in output
    assert registered(cli, store, folder, "--analyses-only").resolve("mapvit").manifest.structure is None


def test_a_cnn_needs_analyses_only(cli, store, tmp_path, labels_file):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3, layers=[1, 1, 1, 1]).eval()
    weights = tmp_path / "cnn.safetensors"
    save_file(resnet.state_dict(), str(weights))
    layers = '{"layers": [1, 1, 1, 1]}'
    base = [
        weights,
        "--architecture",
        "resnet18",
        "--model-args",
        layers,
        "--labels",
        labels_file,
        "--input-size",
        "64x64",
    ]
    output = refused(cli, store, *base)
    assert "the class-embedding lens cannot open resnet18" in output.replace("\n", " ")

    entry = registered(cli, store, *base, "--analyses-only").resolve("cnn")
    assert entry.manifest.structure is None
    assert entry.manifest.input.height == 64
    same_logits(entry, resnet, size=64)


# -- register() and ModelSources directly ----------------------------------------------------------------


def test_register_raises_registration_error_only(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(tiny_vit().state_dict(), str(weights))
    with pytest.raises(RegistrationError, match="no architecture"):
        register(ModelSources.locate(weights), RegisterOptions(name="w"), tmp_path / "store")
    assert not (tmp_path / "store").exists()
    entry = register(
        ModelSources.locate(weights), RegisterOptions(name="w", architecture=ARCH, model_args=TINY), tmp_path / "store"
    )
    assert entry.reference == "w@1"
    with pytest.raises(RegistrationError, match="exists"):
        register(
            ModelSources.locate(weights),
            RegisterOptions(name="w", architecture=ARCH, model_args=TINY),
            tmp_path / "store",
        )


def test_locate_finds_the_files_by_their_usual_names(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(ManifestError, match="no weights file"):
        ModelSources.locate(folder)
    (folder / "a.pth").write_bytes(b"x")
    (folder / "b.safetensors").write_bytes(b"x")
    with pytest.raises(ManifestError, match="several weights files"):
        ModelSources.locate(folder)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    assert ModelSources.locate(folder).weights.name == "pytorch_model.bin"
    (folder / "model.safetensors").write_bytes(b"x")
    for name in ("config.json", "preprocessor_config.json", "labels.txt"):
        (folder / name).write_text("{}")
    sources = ModelSources.locate(folder)
    assert sources.weights.name == "model.safetensors"
    assert (sources.config, sources.preprocessor_config, sources.labels) == (
        folder / "config.json",
        folder / "preprocessor_config.json",
        folder / "labels.txt",
    )
    # A weights file given on its own brings only itself (and the labels named).
    alone = ModelSources.locate(folder / "a.pth", labels=folder / "labels.txt")
    assert (alone.weights, alone.config, alone.labels) == (folder / "a.pth", None, folder / "labels.txt")
    with pytest.raises(ManifestError, match="not a weights file"):
        ModelSources.locate(folder / "config.json")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ManifestError, match="shards"):
        ModelSources.locate(folder)


def test_register_options_refuse_unknown_fields_and_bad_names():
    with pytest.raises(ValueError, match="extra"):
        RegisterOptions(name="x", weights="y")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="pattern"):
        RegisterOptions(name="../escape")
