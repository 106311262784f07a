"""Derive a manifest's preprocessing steps from the configuration a model was published with.

A model is only explained faithfully if the service feeds it the tensor its own eval
transform would: a picture resized another way is an input the production model never
sees. The two functions here turn the configurations that travel with timm and Hugging
Face checkpoints into :class:`~model_store.manifest.Preprocessing` steps, which
:func:`classlens.core.images.fit_to_input` then applies with Pillow alone.

- :func:`from_timm_config`: timm's data config (``timm.data.resolve_data_config``) or the
  ``pretrained_cfg`` of a timm ``config.json``; the steps reproduce timm 1.0's
  ``create_transform(**config)`` for evaluation (``transforms_imagenet_eval``).
- :func:`from_hf_processor`: a Hugging Face ``preprocessor_config.json`` of the ViT, DeiT
  or BEiT kind (resize, optional centre crop, rescale by 1/255, normalise).

Torch-free and timm-free on purpose: models are registered and manifests written by
processes that never import either, so the arithmetic of those libraries is re-stated
here (with the line of theirs it reproduces named beside it) rather than imported.
Anything the manifest's steps cannot state exactly raises
:class:`~model_store.manifest.ManifestError` instead of silently approximating it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

from pydantic import ValidationError

from model_store.manifest import (
    Interpolation,
    ManifestError,
    Preprocessing,
    ResizeMode,
    describe_validation_error,
)

__all__ = ["from_hf_processor", "from_timm_config"]

# timm.data.constants: DEFAULT_CROP_PCT, DEFAULT_CROP_MODE, IMAGENET_DEFAULT_MEAN / _STD.
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_DEFAULT_CROP_MODE = "center"
# create_transform's default; resolve_data_config and timm's PretrainedCfg write "bicubic"
# into every config they produce, so this applies only to a hand-written config.
TIMM_DEFAULT_INTERPOLATION = "bilinear"
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# transformers.image_utils: IMAGENET_STANDARD_MEAN / _STD, what ViT, DeiT and BEiT default to.
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

_INTERPOLATIONS: frozenset[str] = frozenset(get_args(Interpolation))
_TIMM_CROP_MODES = ("center", "squash", "border")

# PIL.Image.Resampling's integer codes, as a preprocessor_config.json stores ``resample``.
_PIL_RESAMPLE: dict[int, Interpolation] = {
    0: "nearest",
    1: "lanczos",
    2: "bilinear",
    3: "bicubic",
    4: "box",
    5: "hamming",
}

# The class defaults of the processors whose keys a config may leave out (transformers 5:
# models/vit, models/deit, models/beit, image_processing_*.py). A saved config states every
# key; these fill the gaps of a hand-written one.
_VIT_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_center_crop": False,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_STANDARD_MEAN),
    "image_std": list(IMAGENET_STANDARD_STD),
}
_DEIT_DEFAULTS: dict[str, Any] = {
    **_VIT_DEFAULTS,
    "size": {"height": 256, "width": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViT": _VIT_DEFAULTS,
    "DeiT": _DEIT_DEFAULTS,
    "Beit": {**_VIT_DEFAULTS, "resample": 3},  # 224x224 bicubic, no crop, mean/std 0.5
}
# By exact type name (ViTHybrid, ViTMAE, ... have other defaults): each backend and the old name.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    f"{family}{suffix}": values
    for family, values in _FAMILY_DEFAULTS.items()
    for suffix in ("ImageProcessor", "ImageProcessorFast", "ImageProcessorPil", "FeatureExtractor")
}
# Keys of other processors that change the pixels in ways these steps cannot state.
_HF_UNSUPPORTED = {
    "crop_pct": "a crop percentage (ConvNeXt-style resize)",
    "do_pad": "padding to a fixed size",
    "size_divisor": "rounding the size to a multiple",
    "size_divisibility": "rounding the size to a multiple",
    "ensure_multiple_of": "rounding the size to a multiple",
    "keep_aspect_ratio": "an aspect-keeping resize to a minimum size",
    "do_flip_channel_order": "swapping the colour channels",
}
_HF_RECORDED = (
    "image_processor_type",
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


def from_timm_config(config: Mapping[str, Any]) -> Preprocessing:
    """The steps that reproduce timm's eval transform, ``timm.data.create_transform(**config)``.

    ``config`` is timm's resolved data config (``input_size`` as (C, H, W), ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode``, optionally ``crop_border_pixels``), or the
    ``pretrained_cfg`` of a ``config.json`` written by ``timm.models.save_for_hf`` (the same
    keys among others; the whole ``config.json`` is accepted too and its ``pretrained_cfg``
    used). ``input_size`` is required: the size the network takes is not something to guess.
    Other keys left out or null take timm's defaults: ``crop_pct`` 0.875, ``crop_mode``
    "center", ``interpolation`` "bilinear" (create_transform's), ImageNet mean and std.

    What ``transforms_imagenet_eval`` builds, and the step list that states it:

    - ``scale_size = floor(edge / crop_pct)`` per edge;
    - "center" with a square ``scale_size``: ``Resize(int)``, the shorter edge to it
      (``resize_mode`` "shorter"), then ``CenterCrop(input_size)``;
    - "center" with a non-square one: ``ResizeKeepRatio(scale_size)`` ("keep_ratio",
      ``longest`` 0), then ``CenterCrop``;
    - "squash": ``Resize(scale_size)`` ("exact"), then ``CenterCrop`` (left out when it
      would not change the picture);
    - "border": ``ResizeKeepRatio(scale_size, longest=1)`` then ``CenterCropOrPad`` with the
      fill ``round(255 * mean)`` per channel (``crop_fill``);
    - ``crop_border_pixels``: ``TrimBorder`` first (``trim_border``).

    timm treats an unknown ``crop_mode`` as "center"; here it is refused, since a typo would
    otherwise pass unseen. ``interpolation`` "random" is a training-time choice and is
    refused too. A single-value ``mean``/``std`` is repeated per channel (timm's ``Normalize``
    broadcasts it the same way). Every failure is a :class:`ManifestError`.
    """
    if "input_size" not in config and isinstance(config.get("pretrained_cfg"), Mapping):
        config = config["pretrained_cfg"]
    if config.get("input_size") is None:
        raise ManifestError("the timm config has no input_size: the (channels, height, width) the model takes")
    channels, height, width = _timm_input_size(config["input_size"])
    defaulted: list[str] = []
    crop_pct = _timm_crop_pct(config, defaulted)
    crop_mode = _timm_crop_mode(config, defaulted)
    interpolation = _timm_interpolation(config, defaulted)
    mean = _per_channel("timm mean", config.get("mean") or IMAGENET_DEFAULT_MEAN, channels)
    std = _per_channel("timm std", config.get("std") or IMAGENET_DEFAULT_STD, channels)
    defaulted += [key for key in ("mean", "std") if not config.get(key)]
    trim = config.get("crop_border_pixels") or 0
    if not _is_whole(trim) or trim < 0:
        raise ManifestError(f"the timm crop_border_pixels must be a whole number of pixels, got {trim!r}")
    trim = int(trim)

    # transforms_imagenet_eval: ``scale_size = math.floor(x / crop_pct)`` for each edge.
    scale_size = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if min(scale_size) < 1:
        raise ManifestError(f"crop_pct {crop_pct} resizes a {height}x{width} input to nothing")
    resize_mode, longest, crop, crop_fill = _timm_resize_and_crop(crop_mode, scale_size, (height, width), mean)

    source: dict[str, Any] = {
        "framework": "timm",
        "input_size": [channels, height, width],
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "interpolation": interpolation,
        "mean": list(mean),
        "std": list(std),
    }
    if trim:
        source["crop_border_pixels"] = trim
    if defaulted:
        source["defaulted"] = defaulted
    return _build(
        "timm config",
        resize=scale_size,
        resize_mode=resize_mode,
        longest=longest,
        interpolation=interpolation,
        crop=crop,
        crop_fill=crop_fill,
        trim_border=trim,
        mean=mean,
        std=std,
        source=source,
    )


def _timm_crop_pct(config: Mapping[str, Any], defaulted: list[str]) -> float:
    given = config.get("crop_pct")
    if not given:  # transforms_imagenet_eval: ``crop_pct = crop_pct or DEFAULT_CROP_PCT``
        defaulted.append("crop_pct")
        return TIMM_DEFAULT_CROP_PCT
    if not _is_number(given):
        raise ManifestError(f"the timm crop_pct must be a number, got {given!r}")
    crop_pct = float(given)
    if not math.isfinite(crop_pct) or crop_pct <= 0:
        raise ManifestError(f"the timm crop_pct must be a positive number, got {crop_pct}")
    return crop_pct


def _timm_crop_mode(config: Mapping[str, Any], defaulted: list[str]) -> str:
    crop_mode = config.get("crop_mode") or TIMM_DEFAULT_CROP_MODE
    if not config.get("crop_mode"):
        defaulted.append("crop_mode")
    if not isinstance(crop_mode, str) or crop_mode not in _TIMM_CROP_MODES:
        raise ManifestError(
            f"the timm crop_mode {crop_mode!r} is not one of {', '.join(_TIMM_CROP_MODES)}; "
            "timm would quietly treat it as 'center', so it is refused rather than guessed"
        )
    return crop_mode


def _timm_interpolation(config: Mapping[str, Any], defaulted: list[str]) -> str:
    interpolation = config.get("interpolation") or TIMM_DEFAULT_INTERPOLATION
    if not config.get("interpolation"):
        defaulted.append("interpolation")
    if interpolation == "random":
        raise ManifestError(
            "the timm interpolation 'random' picks bilinear or bicubic at random per image: "
            "an eval transform needs one fixed interpolation"
        )
    if not isinstance(interpolation, str) or interpolation not in _INTERPOLATIONS:
        raise ManifestError(
            f"the timm interpolation {interpolation!r} is not one of {', '.join(sorted(_INTERPOLATIONS))}"
        )
    return interpolation


def _timm_resize_and_crop(
    crop_mode: str, scale_size: tuple[int, int], target: tuple[int, int], mean: tuple[float, ...]
) -> tuple[ResizeMode, float, tuple[int, int] | None, tuple[int, ...] | None]:
    """Resize mode, ``longest``, crop and crop fill of ``transforms_imagenet_eval`` for ``crop_mode``."""
    if crop_mode == "squash":
        # CenterCrop to the picture's own size changes nothing.
        return "exact", 0.0, (None if scale_size == target else target), None
    if crop_mode == "border":
        # transforms_imagenet_eval: ``fill = [round(255 * v) for v in mean]`` (Python's round).
        return "keep_ratio", 1.0, target, tuple(round(255 * value) for value in mean)
    if scale_size[0] == scale_size[1]:
        return "shorter", 0.0, target, None  # torchvision Resize(int)
    return "keep_ratio", 0.0, target, None  # ResizeKeepRatio(scale_size), longest 0


def from_hf_processor(config: Mapping[str, Any]) -> Preprocessing:
    """The steps of a Hugging Face ``preprocessor_config.json`` of the ViT / DeiT / BEiT kind.

    Those processors resize (``do_resize``, ``size`` as ``{"height", "width"}``, ``resample`` a
    PIL filter code), optionally centre-crop (``do_center_crop``, ``crop_size``), rescale by
    ``rescale_factor`` and normalise with ``image_mean`` / ``image_std``.

    Any ``image_processor_type`` is accepted when its keys fit these steps; keys a config
    leaves out take the class defaults of ViT, DeiT or BEiT processors when the type names
    one of them, and are an error otherwise. Refused, each with the reason:

    - ``do_resize`` false (the output size would follow the image's);
    - ``do_rescale`` false, or a ``rescale_factor`` other than 1/255 (the manifest always
      scales pixels to [0, 1] before normalising);
    - ``size`` as ``{"shortest_edge"}``: without a crop the output size follows the image's,
      and with one the crop cannot be stated exactly, because Hugging Face truncates the
      crop offset where the manifest rounds it half to even (as timm and torchvision do),
      and along the longer edge, whose length follows the image's, the two disagree by a
      pixel for about one image size in four;
    - a crop whose offset (or padding) the two roundings place differently for the fixed
      resize, e.g. resize 227 and crop 224;
    - keys that change the pixels in ways the steps cannot state (``crop_pct``,
      ``do_pad``, ``do_flip_channel_order``, ...).

    ``do_normalize`` false gives mean 0 and std 1 (the tensor stays in [0, 1]).
    """
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    defaults = _HF_DEFAULTS.get(kind, {})
    for key, what in _HF_UNSUPPORTED.items():
        if config.get(key):
            raise ManifestError(f"the preprocessor config sets {key} ({what}), which the manifest cannot state")

    def value(key: str) -> Any:
        if config.get(key) is not None:
            return config[key]
        if key in defaults:
            return defaults[key]
        raise ManifestError(
            f"the preprocessor config has no {key}, and {kind or 'an unnamed processor type'} has no default known here"
        )

    _check_hf_scaling(value)
    resample = value("resample")
    if not _is_whole(resample) or int(resample) not in _PIL_RESAMPLE:
        raise ManifestError(
            f"the preprocessor resample {resample!r} is not a PIL filter code "
            f"({', '.join(f'{code} {name}' for code, name in _PIL_RESAMPLE.items())})"
        )
    interpolation = _PIL_RESAMPLE[int(resample)]

    resize = _hf_resize(value("size"))

    crop: tuple[int, int] | None = None
    if config.get("do_center_crop", defaults.get("do_center_crop", False)):
        crop = _hf_size("crop_size", value("crop_size"))
        for axis, length, window in (("height", resize[0], crop[0]), ("width", resize[1], crop[1])):
            _check_hf_crop_placement(axis, length, window)
        if crop == resize:  # a crop to the picture's own size changes nothing
            crop = None

    if value("do_normalize"):
        mean = _per_channel("image_mean", value("image_mean"), None)
        std = _per_channel("image_std", value("image_std"), len(mean))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    source: dict[str, Any] = {"framework": "transformers"}
    source.update({key: config[key] for key in _HF_RECORDED if config.get(key) is not None})
    return _build(
        "preprocessor config",
        resize=resize,
        resize_mode="exact",
        interpolation=interpolation,
        crop=crop,
        mean=mean,
        std=std,
        source=source,
    )


def _check_hf_scaling(value: Callable[[str], Any]) -> None:
    """Refuse a processor that does not resize, or does not scale pixels to [0, 1] by 1/255."""
    if not value("do_resize"):
        raise ManifestError(
            "the preprocessor config does not resize (do_resize false): the model's input size would follow the image's"
        )
    if not value("do_rescale"):
        raise ManifestError(
            "the preprocessor config does not rescale (do_rescale false): the manifest always scales pixels to [0, 1]"
        )
    factor = value("rescale_factor")
    if not _is_number(factor) or not math.isclose(float(factor), 1 / 255):
        raise ManifestError(f"the preprocessor rescale_factor is {factor!r}; the manifest scales by 1/255 only")


def _hf_resize(size: Any) -> tuple[int, int]:
    """The fixed (height, width) of a processor's ``size``; ``shortest_edge`` is refused (:func:`from_hf_processor`)."""
    if isinstance(size, Mapping):  # older configs list the unused keys as null
        size = {key: edge for key, edge in size.items() if edge is not None}
    if isinstance(size, Mapping) and "shortest_edge" in size:
        raise ManifestError(
            "the preprocessor resizes the shortest edge (size.shortest_edge): without a crop the output size "
            "follows the image's, and with one Hugging Face truncates the crop offset where timm and torchvision "
            "round it, so for about one image size in four the window would sit a pixel off"
        )
    return _hf_size("size", size)


def _timm_input_size(input_size: Any) -> tuple[int, int, int]:
    """(channels, height, width) from timm's ``input_size``: (C, H, W), (H, W) or one edge.

    create_transform uses ``input_size[-2:]`` of a sequence and an int as a square; a
    two-value or int size says nothing of the channels, taken as 3 (timm's default).
    """
    if _is_whole(input_size):
        values = [3, input_size, input_size]
    elif isinstance(input_size, Sequence) and not isinstance(input_size, str) and len(input_size) in (2, 3):
        values = [3, *input_size] if len(input_size) == 2 else list(input_size)
    else:
        raise ManifestError(f"the timm input_size must be (channels, height, width), got {input_size!r}")
    if any(not _is_whole(v) or v < 1 for v in values):
        raise ManifestError(f"the timm input_size must hold positive whole numbers, got {input_size!r}")
    values = [int(v) for v in values]
    if values[0] not in (1, 3):
        raise ManifestError(f"the timm input_size has {values[0]} channels; the manifest takes 1 (L) or 3 (RGB)")
    return values[0], values[1], values[2]


def _per_channel(name: str, values: Any, channels: int | None) -> tuple[float, ...]:
    """``values`` as floats, one per channel; a single value is repeated, as a broadcast would."""
    if _is_number(values):
        values = [values]
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ManifestError(f"the {name} must be a list of numbers, got {values!r}")
    if not all(_is_number(v) for v in values):
        raise ManifestError(f"the {name} must be a list of numbers, got {values!r}")
    floats = tuple(float(v) for v in values)
    wanted = channels if channels is not None else (3 if len(floats) == 1 else len(floats))
    if len(floats) == 1:
        return floats * wanted
    if len(floats) != wanted or wanted not in (1, 3):
        raise ManifestError(f"the {name} has {len(floats)} values for {wanted} channel(s)")
    return floats


def _hf_size(name: str, size: Any) -> tuple[int, int]:
    """(height, width) of a Hugging Face size: ``{"height", "width"}``, or an int for a square."""
    if isinstance(size, Mapping):
        size = {key: edge for key, edge in size.items() if edge is not None}
    if _is_whole(size):
        pair: tuple[Any, Any] = (size, size)
    elif isinstance(size, Mapping) and set(size) == {"height", "width"}:
        pair = (size["height"], size["width"])
    else:
        raise ManifestError(f'the preprocessor {name} must be {{"height": H, "width": W}}, got {size!r}')
    if any(not _is_whole(v) or v < 1 for v in pair):
        raise ManifestError(f"the preprocessor {name} must hold positive whole numbers, got {size!r}")
    return int(pair[0]), int(pair[1])


def _check_hf_crop_placement(axis: str, length: int, window: int) -> None:
    """Refuse a crop that Hugging Face places differently from the manifest's centre crop.

    Hugging Face (both backends) offsets the window by ``(length - window) // 2``; the
    manifest, like torchvision's CenterCrop, by ``round((length - window) / 2)``, half to
    even: they differ when the difference is 3 modulo 4. A window larger than the picture
    is padded, by Hugging Face's PIL backend with the odd pixel before the picture and by
    torchvision (and its torchvision backend) with it after: they differ when the
    difference is odd.
    """
    difference = length - window
    placed_apart = difference // 2 != round(difference / 2) if difference >= 0 else difference % 2 == 1
    if placed_apart:
        raise ManifestError(
            f"the preprocessor crops {window} of {length} pixels in {axis}: Hugging Face and the manifest's centre "
            "crop (timm's and torchvision's) would place that window a pixel apart"
        )


def _is_number(value: Any) -> bool:
    """A real number (NumPy's included), not a bool: JSON's true must not pass as 1."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _build(what: str, **steps: Any) -> Preprocessing:
    try:
        return Preprocessing(**steps)
    except ValidationError as error:
        reason = describe_validation_error(error)
        raise ManifestError(f"the {what} gives steps the manifest refuses: {reason}") from None
