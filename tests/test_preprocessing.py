"""Preprocessing parity: the service's input tensor equals the one the model's own eval transform makes.

The manifest's steps (model_store.preprocessing derives them, classlens.core.images.fit_to_input applies
them with Pillow, worker.preprocess scales and normalises) are compared with timm's
``create_transform(**data_config)`` and with Hugging Face's ViT and DeiT image processors, on
non-square, odd-sized, tiny, grey and RGBA pictures. The bundled Fashion-MNIST models must see
exactly what they saw before the steps were extended.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import worker  # noqa: F401  (torchvision compatibility before timm)
from classlens.core.images import ImageError, fit_to_input
from model_store.catalog import BUNDLED_ROOT
from model_store.manifest import InputSpec, ManifestError, Preprocessing, read_manifest
from model_store.preprocessing import from_hf_processor, from_timm_config
from worker.preprocess import preprocess

PARITY = 1e-6
# (width, height): non-square both ways, odd, very elongated, and smaller than any crop.
SIZES = [(320, 240), (241, 333), (100, 500), (17, 19)]
MODES = ["RGB", "L", "RGBA"]
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def noise(size: tuple[int, int], mode: str, seed: int = 0) -> Image.Image:
    """Random pixels (the hardest case for a resize filter), with a random alpha for RGBA."""
    width, height = size
    pixels = np.random.default_rng([seed, width, height]).integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba = Image.fromarray(pixels, mode="RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


IMAGES = [noise(size, mode) for size in SIZES for mode in MODES]


def spec_for(steps: Preprocessing, colour_mode: str = "RGB") -> InputSpec:
    height, width = steps.output_size
    return InputSpec(height=height, width=width, channels=1 if colour_mode == "L" else 3, colour_mode=colour_mode)


def worst_difference(reference: Any, ours: torch.Tensor) -> float:
    assert reference.shape == ours.shape
    assert ours.dtype == torch.float32
    return float((reference - ours).abs().max())


# timm ------------------------------------------------------------------------------------------------------

# (model arguments, pretrained_cfg overlay): each takes a different branch of transforms_imagenet_eval.
TIMM_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "center-0.875-bilinear": ({}, {"crop_pct": 0.875, "interpolation": "bilinear", **IMAGENET}),
    "center-1.0": ({}, {"crop_pct": 1.0}),
    "center-0.9-bicubic": ({}, {"crop_pct": 0.9, "interpolation": "bicubic"}),
    "center-non-square-keep-ratio": ({"img_size": (192, 256)}, {"input_size": (3, 192, 256), "crop_pct": 0.875}),
    "center-1.15-pads-with-black": ({}, {"crop_pct": 1.15}),
    "squash": ({}, {"crop_mode": "squash", "crop_pct": 0.875}),
    "squash-non-square": ({"img_size": (192, 256)}, {"input_size": (3, 192, 256), "crop_mode": "squash"}),
    "border": ({}, {"crop_mode": "border", "crop_pct": 0.875, **IMAGENET}),
    "border-non-square": ({"img_size": (192, 256)}, {"input_size": (3, 192, 256), "crop_mode": "border"}),
    "lanczos": ({}, {"interpolation": "lanczos"}),
    "nearest": ({}, {"interpolation": "nearest"}),
    "box": ({}, {"interpolation": "box"}),
    "hamming": ({}, {"interpolation": "hamming"}),
}


def timm_model(model_args: dict[str, Any], overlay: dict[str, Any], **extra: Any) -> Any:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        depth=1,  # one block: the data config is the same, the model builds in a tenth of the time
        pretrained_cfg_overlay=overlay,
        **model_args,
        **extra,
    )


def assert_timm_parity(config: dict[str, Any], colour_mode: str = "RGB") -> Preprocessing:
    """Every test image through timm's transform and through ours: equal within PARITY."""
    import timm.data

    transform = timm.data.create_transform(**config)
    steps = from_timm_config(config)
    spec = spec_for(steps, colour_mode)
    for image in IMAGES:
        # timm's datasets convert with PIL before the transform (ImageDataset's input_img_mode).
        reference = transform(image.convert(colour_mode))
        ours = preprocess(image, spec, steps)
        difference = worst_difference(reference, ours)
        assert difference <= PARITY, (config, image.size, image.mode, difference)
    return steps


@functools.cache
def timm_case_config(case: str) -> dict[str, Any]:
    """timm's resolved data config of a small random model built for the case (cached per case)."""
    import timm.data

    model_args, overlay = TIMM_CASES[case]
    config: dict[str, Any] = timm.data.resolve_data_config({}, model=timm_model(model_args, overlay))
    return config


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_eval_transform_parity(case: str) -> None:
    config = timm_case_config(case)
    steps = assert_timm_parity(config)
    assert steps.output_size == tuple(config["input_size"][1:])
    assert steps.source["framework"] == "timm"
    assert steps.source["crop_mode"] == config["crop_mode"]
    # The manifest stores the steps as YAML: they must come back unchanged.
    assert Preprocessing.model_validate(yaml.safe_load(yaml.safe_dump(steps.model_dump(mode="json")))) == steps


def test_timm_steps_take_each_branch() -> None:
    """The cases above exercise what they claim (a parity test over one branch only would prove little)."""

    def steps_of(case: str) -> Preprocessing:
        return from_timm_config(timm_case_config(case))

    default = steps_of("center-0.875-bilinear")
    assert (default.resize_mode, default.resize, default.crop) == ("shorter", (256, 256), (224, 224))
    keep = steps_of("center-non-square-keep-ratio")
    assert (keep.resize_mode, keep.longest, keep.resize, keep.crop) == ("keep_ratio", 0.0, (219, 292), (192, 256))
    squash = steps_of("squash")
    assert (squash.resize_mode, squash.resize, squash.crop) == ("exact", (256, 256), (224, 224))
    border = steps_of("border")
    assert (border.resize_mode, border.longest, border.crop_fill) == ("keep_ratio", 1.0, (124, 116, 104))
    assert steps_of("center-1.0").resize == (224, 224)


def test_the_old_fixed_resize_was_not_timms_input() -> None:
    """What this module fixes: resizing straight to 224x224 gives timm's default model another input."""
    import timm.data

    config = timm_case_config("center-0.875-bilinear")
    image = noise((320, 240), "RGB")
    reference = timm.data.create_transform(**config)(image)
    old = Preprocessing(resize=(224, 224), interpolation="bilinear", **IMAGENET)
    assert worst_difference(reference, preprocess(image, spec_for(old), old)) > 0.5
    assert worst_difference(reference, preprocess(image, spec_for(old), from_timm_config(config))) <= PARITY


def test_timm_trimmed_border_parity() -> None:
    """crop_border_pixels (TrimBorder before the resize); resolve_data_config never sets it, so add it."""
    config = {**timm_case_config("center-0.9-bicubic"), "crop_border_pixels": 3}
    steps = assert_timm_parity(config)
    assert steps.trim_border == 3
    assert steps.source["crop_border_pixels"] == 3


@pytest.mark.parametrize("crop_mode", ["center", "border", "squash"])
def test_timm_grey_model_parity(crop_mode: str) -> None:
    """A model with in_chans 1: timm's transform runs on an 'L' picture (timm's train and validate
    scripts pick input_img_mode 'L' for one channel); resolve_input_data_config gives one mean and std.
    """
    import timm.data

    model = timm_model({}, {"crop_mode": crop_mode}, in_chans=1)
    config = timm.data.resolve_input_data_config(model)
    assert config["input_size"][0] == 1
    assert len(config["mean"]) == 1
    steps = assert_timm_parity(config, colour_mode="L")
    assert len(steps.mean) == 1
    if crop_mode == "border":
        assert steps.crop_fill == (round(255 * config["mean"][0]),)
    model.eval()
    with torch.no_grad():  # the tensor is what the grey model takes
        assert model(preprocess(IMAGES[0], spec_for(steps, "L"), steps)[None]).shape == (1, 3)


def test_timm_config_json_of_save_for_hf(tmp_path: Path) -> None:
    """The pretrained_cfg of a config.json written by timm.models.save_for_hf (offline) gives the same steps."""
    import timm.data
    import timm.models

    model = timm_model({}, {"crop_pct": 0.95, "crop_mode": "center", "interpolation": "bicubic", **IMAGENET})
    timm.models.save_for_hf(model, str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    from_pretrained_cfg = from_timm_config(written["pretrained_cfg"])
    assert from_timm_config(written) == from_pretrained_cfg  # the whole config.json is accepted too
    resolved = timm.data.resolve_data_config({}, model=model)
    assert from_pretrained_cfg == from_timm_config(resolved)
    steps = assert_timm_parity(resolved)
    assert steps == from_pretrained_cfg
    assert steps.resize == (235, 235)


def test_timm_missing_keys_take_create_transforms_defaults() -> None:
    """Only input_size given: crop_pct 0.875, center, bilinear, ImageNet mean and std, as create_transform."""
    steps = assert_timm_parity({"input_size": (3, 224, 224)})
    assert (steps.resize, steps.resize_mode, steps.interpolation) == ((256, 256), "shorter", "bilinear")
    assert steps.mean == IMAGENET["mean"]
    assert steps.std == IMAGENET["std"]
    assert set(steps.source["defaulted"]) == {"crop_pct", "crop_mode", "interpolation", "mean", "std"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interpolation": "random"}, "random"),
        ({"interpolation": "area"}, "interpolation 'area'"),
        ({"crop_mode": "centre"}, "crop_mode 'centre'"),
        ({"input_size": None}, "no input_size"),
        ({"input_size": (4, 224, 224)}, "4 channels"),
        ({"input_size": (224, 192)}, None),  # (H, W), as create_transform reads input_size[-2:]
        ({"crop_pct": -0.5}, "positive"),
        ({"crop_pct": "0.9"}, "number"),
        ({"mean": (0.5, 0.5)}, "2 values"),
        ({"input_size": (1, 224, 224)}, "3 values for 1 channel"),
        ({"crop_border_pixels": 1.5}, "whole number"),
    ],
)
def test_timm_config_refusals(change: dict[str, Any], message: str | None) -> None:
    config = {"input_size": (3, 224, 224), "crop_pct": 0.9, "crop_mode": "center", **IMAGENET, **change}
    config = {key: value for key, value in config.items() if value is not None}
    if message is None:
        assert from_timm_config(config).output_size == tuple(config["input_size"][-2:])
        return
    with pytest.raises(ManifestError, match=message):
        from_timm_config(config)


# Hugging Face ----------------------------------------------------------------------------------------------

RGB_IMAGES = [noise(size, "RGB", seed=1) for size in [*SIZES, (224, 224), (256, 256), (640, 480)]]


def processor_config(processor: Any, folder: Path) -> dict[str, Any]:
    """The preprocessor_config.json the processor writes, read back as a model registration would."""
    processor.save_pretrained(folder)
    config: dict[str, Any] = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    return config


def hf_differences(processor: Any, steps: Preprocessing) -> tuple[float, float]:
    """(max, mean) absolute difference in grey levels (|delta| * std * 255) over RGB_IMAGES."""
    spec = spec_for(steps)
    std = torch.tensor(steps.std)[:, None, None]
    worst, mean = 0.0, 0.0
    for image in RGB_IMAGES:
        reference = processor(images=image, return_tensors="pt")["pixel_values"][0]
        ours = preprocess(image, spec, steps)
        assert reference.shape == ours.shape
        levels = (reference - ours).abs() * std * 255
        worst, mean = max(worst, float(levels.max())), max(mean, float(levels.mean()))
    return worst, mean


@pytest.mark.parametrize("name", ["ViT", "DeiT"])
def test_hf_pil_backend_parity(name: str, tmp_path: Path) -> None:
    """transformers' PIL backend resizes with Pillow as the manifest does: equal within PARITY (measured 0)."""
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    processor = {"ViT": ViTImageProcessorPil, "DeiT": DeiTImageProcessorPil}[name]()
    steps = from_hf_processor(processor_config(processor, tmp_path))
    worst, _ = hf_differences(processor, steps)
    assert worst / 255 / 0.5 <= PARITY
    assert steps.source["framework"] == "transformers"


@pytest.mark.parametrize(
    ("name", "max_levels", "mean_levels"),
    [
        # Measured on RGB_IMAGES (random pixels), in grey levels: bilinear at most 1 (0.0078 after
        # normalising with std 0.5), 0.24 on average over the worst image.
        ("ViT", 1.0, 0.25),
        # Bicubic: 17 (0.133 normalised; 18 seen on other noise) where one edge is enlarged and the
        # other reduced (241x333, 100x500), at most 1 otherwise; 0.357 on average over the worst image.
        ("DeiT", 18.0, 0.36),
    ],
)
def test_hf_torchvision_backend_measured_bound(
    name: str, max_levels: float, mean_levels: float, tmp_path: Path
) -> None:
    """ViTImageProcessor and DeiTImageProcessor (transformers 5: the torchvision backend) resize with torch's
    antialiased tensor interpolation, not Pillow's: the manifest's steps reproduce them within these bounds.
    """
    from transformers import DeiTImageProcessor, ViTImageProcessor

    processor = {"ViT": ViTImageProcessor, "DeiT": DeiTImageProcessor}[name]()
    config = processor_config(processor, tmp_path)
    assert config["image_processor_type"] == f"{name}ImageProcessor"
    steps = from_hf_processor(config)
    worst, mean = hf_differences(processor, steps)
    assert worst <= max_levels + 1e-3, (worst, mean)
    assert mean <= mean_levels + 1e-3, (worst, mean)


@pytest.mark.parametrize("name", ["ViT", "DeiT", "Beit"])
def test_hf_defaults_are_the_processors_own(name: str, tmp_path: Path) -> None:
    """A config naming only its type gets that processor's class defaults, as transformers would."""
    import transformers

    processor = getattr(transformers, f"{name}ImageProcessor")()
    saved = from_hf_processor(processor_config(processor, tmp_path))
    named = from_hf_processor({"image_processor_type": f"{name}ImageProcessor"})
    assert named.model_copy(update={"source": saved.source}) == saved
    expected = {
        "ViT": ((224, 224), None, "bilinear"),
        "DeiT": ((256, 256), (224, 224), "bicubic"),
        "Beit": ((224, 224), None, "bicubic"),
    }[name]
    assert (saved.resize, saved.crop, saved.interpolation) == expected
    assert saved.resize_mode == "exact"
    assert saved.mean == (0.5, 0.5, 0.5)
    assert saved.std == (0.5, 0.5, 0.5)


def test_hf_without_normalising_and_an_unknown_processor_type(tmp_path: Path) -> None:
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    processor = ViTImageProcessorPil(do_normalize=False, size={"height": 96, "width": 160}, resample=4)
    config = processor_config(processor, tmp_path)
    steps = from_hf_processor(config)
    assert steps.mean == (0.0, 0.0, 0.0)
    assert steps.std == (1.0, 1.0, 1.0)
    assert steps.interpolation == "box"
    worst, _ = hf_differences(processor, steps)
    assert worst / 255 <= PARITY
    # Any processor type whose keys fit is accepted: the keys decide, not the name.
    renamed = from_hf_processor({**config, "image_processor_type": "MyImageProcessor"})
    assert renamed.model_copy(update={"source": steps.source}) == steps


FULL_HF = {
    "image_processor_type": "DeiTImageProcessor",
    "do_resize": True,
    "size": {"height": 256, "width": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": {"shortest_edge": 256}}, "shortest edge"),
        ({"do_resize": False}, "does not resize"),
        ({"do_rescale": False}, "does not rescale"),
        ({"rescale_factor": 1 / 127.5}, "1/255"),
        ({"resample": 7}, "not a PIL filter code"),
        ({"size": {"height": 227, "width": 227}}, "a pixel apart"),  # offset 1 (HF) vs round(1.5) = 2
        ({"crop_size": {"height": 257, "width": 257}}, "a pixel apart"),  # odd padding
        ({"crop_pct": 0.875}, "crop_pct"),
        ({"do_pad": True}, "do_pad"),
        ({"image_mean": [0.5, 0.5]}, "2 values"),
        ({"image_processor_type": "MyImageProcessor", "image_std": None}, "no image_std"),
        ({"size": {"height": 229, "width": 229}}, None),  # offset round(2.5) = 2 = 5 // 2: accepted
        ({"crop_size": {"height": 256, "width": 256}}, None),  # a crop that changes nothing is dropped
    ],
)
def test_hf_refusals(change: dict[str, Any], message: str | None) -> None:
    config = {key: value for key, value in {**FULL_HF, **change}.items() if value is not None}
    if message is None:
        steps = from_hf_processor(config)
        assert steps.crop in ((224, 224), None)
        return
    with pytest.raises(ManifestError, match=message):
        from_hf_processor(config)


# fit_to_input's own steps --------------------------------------------------------------------------------


def test_centre_crop_offsets_round_half_to_even_as_torchvision() -> None:
    """Differences 1, 3, 5, 7 to the crop: offsets 0, 2, 2, 4 (torchvision's round), not 0, 1, 2, 3."""
    from torchvision.transforms import CenterCrop

    image = noise((231, 230), "RGB")
    for edge in (225, 227, 229, 231):
        steps = Preprocessing(resize=(edge, edge), crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
        resized = image.resize((edge, edge), Image.Resampling.BILINEAR)
        expected = np.asarray(CenterCrop(224)(resized))
        np.testing.assert_array_equal(np.asarray(fit_to_input(image, spec_for(steps), steps)), expected)


def test_images_the_steps_cannot_fit_are_refused() -> None:
    trim = Preprocessing(resize=(28, 28), trim_border=10, mean=(0.5,), std=(0.5,))
    with pytest.raises(ImageError, match="leaves nothing"):
        fit_to_input(noise((20, 40), "L"), spec_for(trim, "L"), trim)
    shorter = Preprocessing(resize=(256, 256), resize_mode="shorter", crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ImageError, match="aspect ratio") as error:
        fit_to_input(Image.new("RGB", (1, 1000)), spec_for(shorter), shorter)
    assert error.value.problem == "too_many_pixels"
    wrong_fill = Preprocessing(resize=(20, 20), crop=(28, 28), crop_fill=(1, 2), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="crop_fill"):
        fit_to_input(noise((20, 20), "RGB"), spec_for(wrong_fill), wrong_fill)


# The bundled demo models ---------------------------------------------------------------------------------


def old_fit_to_input(image: Image.Image, spec: InputSpec, steps: Preprocessing) -> Image.Image:
    """The fixed resize the bundled models were trained and measured with (before resize modes existed)."""
    image = image.convert(spec.colour_mode)
    height, width = steps.resize
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image


@pytest.mark.parametrize("path", sorted(BUNDLED_ROOT.glob("*/*/manifest.yaml")), ids=lambda p: p.parent.parent.name)
def test_bundled_models_see_what_they_saw(path: Path) -> None:
    manifest = read_manifest(path)
    steps, spec = manifest.preprocessing, manifest.input
    assert (steps.resize_mode, steps.crop, steps.trim_border, steps.interpolation) == ("exact", None, 0, "bilinear")
    for image in [*IMAGES, noise((28, 28), "L"), noise((28, 28), "RGB")]:
        old = old_fit_to_input(image, spec, steps)
        new = fit_to_input(image, spec, steps)
        assert (new.mode, new.size) == (old.mode, old.size)
        assert new.tobytes() == old.tobytes()
        pixels = np.asarray(old, dtype=np.float32) / 255.0
        channels_first = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        mean, std = (torch.tensor(values)[:, None, None] for values in (steps.mean, steps.std))
        expected = (torch.from_numpy(channels_first.copy()) - mean) / std
        assert torch.equal(preprocess(image, spec, steps), expected)
