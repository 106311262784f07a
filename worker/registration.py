"""Register a model from the files people already have, in one step: :func:`register`.

What arrives (:class:`~model_store.sources.ModelSources`) is one of:

- a timm hub folder (``timm.models.save_for_hf``): ``config.json`` names the architecture,
  its ``model_args``, ``label_names`` and the ``pretrained_cfg`` preprocessing;
- a transformers folder (``save_pretrained`` of a ViT or DeiT classifier): ``config.json``
  with ``architectures``, ``model_type`` and ``id2label``, and, when the image processor
  was saved too, ``preprocessor_config.json``;
- a plain state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``), with a timm
  architecture named by the options;
- a timm ``train.py`` checkpoint (``.pth.tar``): a dict holding ``state_dict``, optionally
  ``state_dict_ema``, ``arch`` and the training ``args``.

Everything the files say is read; the options (:class:`~model_store.sources.RegisterOptions`)
only override. The weights are then made plain (unwrapped from a training checkpoint, a
DDP ``module.`` prefix removed), loaded strictly into the model they describe, run once
on an input of the size the preprocessing ends at, described by the lens
(:func:`worker.lens.families.describe`), and stored as safetensors by
:func:`model_store.catalog.add_model`, which writes nothing in place unless all of that
worked. Whatever the user can fix raises :class:`RegistrationError`, whose message is one
short paragraph: what does not fit, a few examples, and the likely cause.

Torch, timm and transformers are used here, so only workers and the CLI import this
module; the API validates uploads with :mod:`model_store.sources` alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from timm.data import resolve_input_data_config
from torch import nn

from model_store.artifacts import ArtifactError, sha256_of
from model_store.catalog import ModelEntry, add_model
from model_store.manifest import ManifestError, Preprocessing, Structure, describe_validation_error
from model_store.preprocessing import from_hf_processor, from_timm_config
from model_store.sources import ModelSources, RegisterOptions, RegistrationError
from worker.checkpoints import Weights, read_weights
from worker.lens.families import describe
from worker.model_loader import (
    TRANSFORMERS_CLASSES,
    Fit,
    ModelLoadError,
    build_model,
    fit_weights,
    load_model,
    logits_of,
    num_classes_of,
    transformers_class,
)
from worker.weight_mismatch import Target, mismatch, shapes

log = logging.getLogger(__name__)

# Labels transformers writes when nobody named the classes: LABEL_0, LABEL_1, ...
_GENERIC_LABEL = re.compile(r"LABEL_\d+")
# The data-config keys of timm train.py's arguments that decide its eval transform.
_TRAIN_DATA_ARGS = ("in_chans", "input_size", "img_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# PIL's resampling codes, as a preprocessor_config.json writes "resample".
_PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass
class _Plan:
    """What will be built: the framework, architecture and arguments, the labels, and where each came from."""

    framework: str
    architecture: str
    model_args: dict[str, Any]
    labels: list[str]
    head_key: str | None
    read: list[str] = field(default_factory=list)  # "labels from labels.txt", ...

    @property
    def target(self) -> Target:
        return Target(self.framework, self.architecture, self.head_key)


def register(
    sources: ModelSources,
    options: RegisterOptions,
    root: Path,
    *,
    warn: Callable[[str], None] | None = None,
) -> ModelEntry:
    """Register the model in ``sources`` under ``root/<name>/<version>/`` and return its entry.

    Nothing is written in place unless the model builds, its weights load strictly, it runs on
    the preprocessing's output size and (unless ``options.analyses_only``) the lens can open
    it. The entry's ``provenance.notes`` says what was read from where. ``warn`` receives what
    the user should know but that does not stop the registration (labels nobody named, say),
    once the model is registered; without ``warn`` these are logged. Raises
    :class:`RegistrationError` for anything the user can fix.
    """
    warnings: list[str] = []  # said only once the model is registered: a failure says what matters
    warning = warnings.append

    folder = root / options.name / options.version
    if folder.exists() and not options.overwrite:
        raise RegistrationError(f"{folder} exists; choose another version or overwrite it (--overwrite)")
    config = _read_json(sources.config) if sources.config else None
    weights = read_weights(sources.weights, ema=options.ema)
    plan = _plan(sources, config, weights, options, warning)
    model = _load(plan, weights, sources.weights.name)
    channels = _channels(model, plan)
    for name in ("mean", "std"):
        given = getattr(options, name)
        if given is not None and len(given) != channels:
            raise RegistrationError(
                f"mean and std need {channels} value(s), one per input channel of {plan.architecture}; "
                f"the {name} given has {len(given)}"
            )
    preprocessing, where = _preprocessing(plan, model, channels, config, weights, sources, options, warning)
    plan.read.append(where)
    height, width = preprocessing.output_size
    _check_forward(model, plan, channels, height, width)
    structure = _structure(model, plan, options)
    plan.read.append(_weights_note(weights, sources.weights.name))
    fields = {
        "name": options.name,
        "version": options.version,
        "description": options.description,
        "framework": plan.framework,
        "architecture": plan.architecture,
        "model_args": plan.model_args,
        "structure": None if structure is None else structure.model_dump(mode="json"),
        "input": {
            "height": height,
            "width": width,
            "channels": channels,
            "colour_mode": options.colour_mode or ("L" if channels == 1 else "RGB"),
        },
        "preprocessing": preprocessing.model_dump(mode="json"),
        "provenance": {
            "data": options.data,
            "recipe": _recipe(weights, sources.weights.name),
            "date": date.today().isoformat(),
            "licence": options.licence,
            "notes": "; ".join(plan.read),
        },
    }
    entry = _store(root, fields, plan, weights, sources.weights, options)
    for message in warnings:
        if warn is None:
            log.warning("%s: %s", entry.reference, message)
        else:
            warn(message)
    return entry


# -- reading the files ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistrationError(f"{path.name}: not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise RegistrationError(f"{path.name}: a config is a JSON object, not {type(data).__name__}")
    return data


# -- what to build ----------------------------------------------------------------------------------------


def _plan(
    sources: ModelSources,
    config: dict[str, Any] | None,
    weights: Weights,
    options: RegisterOptions,
    warning: Callable[[str], None],
) -> _Plan:
    config_name = sources.config.name if sources.config else "config.json"
    if config is not None and isinstance(config.get("architecture"), str):
        plan = _timm_plan(config, weights, options, config_name)
    elif config is not None and ("model_type" in config or "architectures" in config):
        plan = _transformers_plan(config, options, config_name)
    elif config is not None:
        raise RegistrationError(
            f"{config_name} is neither timm's (save_for_hf: architecture, model_args, pretrained_cfg) nor "
            "transformers' (save_pretrained: architectures, model_type)"
        )
    elif options.architecture in TRANSFORMERS_CLASSES:
        raise RegistrationError(
            f"a transformers {options.architecture} is registered from the folder save_pretrained wrote: "
            "its config.json is needed to build the model"
        )
    else:
        plan = _timm_plan(None, weights, options, "")
    _settle_classes(plan, sources, config, weights, options, warning)
    return plan


def _timm_architecture(
    config: dict[str, Any] | None, weights: Weights, options: RegisterOptions, where: str
) -> tuple[str, str]:
    """The timm architecture to build and where it was found: as given, the config, the checkpoint's args or arch."""
    args = weights.args
    if options.architecture:
        architecture, source = options.architecture, "as given"
    elif config is not None:
        architecture, source = config["architecture"], f"from {where}"
    elif isinstance(args.get("model"), str):
        architecture, source = args["model"], "from the checkpoint's args.model"
    elif weights.arch and timm.is_model(weights.arch):
        architecture, source = weights.arch, "from the checkpoint's arch"
    else:
        raise RegistrationError(
            "no architecture: a state dict does not say which model it belongs to. Name the timm architecture "
            "(e.g. vit_small_patch16_224), or register the folder save_for_hf or save_pretrained wrote"
        )
    if architecture in TRANSFORMERS_CLASSES:
        raise RegistrationError(
            f"{architecture} is a transformers class: register the folder save_pretrained wrote (with its config.json)"
        )
    if not timm.is_model(architecture):
        close = _close_names(architecture)
        raise RegistrationError(
            f"timm has no architecture {architecture!r}{f'; did you mean {close}?' if close else ''}"
        )
    return architecture, source


def _timm_plan(config: dict[str, Any] | None, weights: Weights, options: RegisterOptions, where: str) -> _Plan:
    args = weights.args
    architecture, source = _timm_architecture(config, weights, options, where)
    model_args: dict[str, Any] = {}
    if config is not None:
        model_args.update(config.get("model_args") or {})
        if config.get("num_classes") is not None:
            model_args.setdefault("num_classes", config["num_classes"])
        args_source = where
    elif args:
        model_args.update(args.get("model_kwargs") or {})
        in_chans = args.get("in_chans") or (args["input_size"][0] if args.get("input_size") else None)
        for key, value in (
            ("num_classes", args.get("num_classes")),
            ("img_size", args.get("img_size")),
            ("in_chans", in_chans),
            ("global_pool", args.get("gp")),
        ):
            if value is not None:
                model_args.setdefault(key, value)
        args_source = "the checkpoint's args"
    else:
        args_source = ""
    model_args.update(options.model_args or {})
    read = [f"architecture {architecture} {source}"]
    if args_source:
        read.append(f"model_args from {args_source}{', with those given' if options.model_args else ''}")
    elif options.model_args:
        read.append("model_args as given")
    head = timm.models.get_pretrained_cfg_value(architecture, "classifier") or "head"
    head = head[0] if isinstance(head, list | tuple) else head
    return _Plan("timm", architecture, model_args, [], f"{head}.weight", read)


def _close_names(architecture: str) -> str:
    import difflib

    return ", ".join(difflib.get_close_matches(architecture, timm.list_models(), n=3))


def _transformers_plan(config: dict[str, Any], options: RegisterOptions, where: str) -> _Plan:
    named = config.get("architectures") or []
    architecture = options.architecture or (named[0] if isinstance(named, list) and named else None)
    if architecture is None:
        raise RegistrationError(
            f"{where} names no architectures; give the transformers class ({', '.join(TRANSFORMERS_CLASSES)})"
        )
    try:
        transformers_class(architecture)
    except ModelLoadError as error:
        raise RegistrationError(
            f"{error} (the class-embedding lens opens these ViT and DeiT classifiers only)"
        ) from None
    # The label maps become labels.txt; the rest of the config rebuilds the same config.
    model_args = {
        key: value
        for key, value in config.items()
        if key not in ("id2label", "label2id", "architectures", "transformers_version")
    }
    if isinstance(config.get("id2label"), dict):
        model_args["num_labels"] = len(config["id2label"])
    model_args.update(options.model_args or {})
    head = "cls_classifier.weight" if architecture.endswith("WithTeacher") else "classifier.weight"
    return _Plan("transformers", architecture, model_args, [], head, [f"{architecture} and its config from {where}"])


def _settle_classes(
    plan: _Plan,
    sources: ModelSources,
    config: dict[str, Any] | None,
    weights: Weights,
    options: RegisterOptions,
    warning: Callable[[str], None],
) -> None:
    """The labels and the class count, from the labels file, the config or the head; they must agree."""
    labels, where = _named_labels(sources, config, plan.framework)
    count_key = "num_labels" if plan.framework == "transformers" else "num_classes"
    head = weights.state.get(plan.head_key or "")
    rows = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim == 2 else None
    if labels is not None:
        if rows is not None and rows != len(labels):
            raise RegistrationError(
                f"The weights do not fit the labels: the checkpoint's head ({plan.head_key}) has {rows} classes but "
                f"{len(labels)} labels were given ({where}). Give one label per output of the head, in its order"
            )
        stated = plan.model_args.get(count_key)
        if stated is not None and stated != len(labels) and (options.model_args or {}).get(count_key) is not None:
            raise RegistrationError(f"model_args {count_key} is {stated} but {len(labels)} labels were given ({where})")
        plan.model_args[count_key] = len(labels)
        plan.labels = labels
        plan.read.append(f"labels from {where}")
        return
    stated = plan.model_args.get(count_key)
    count = stated if stated is not None else rows
    if not isinstance(count, int) or count < 2:
        raise RegistrationError(_unknown_classes(plan, weights, count_key))
    plan.model_args[count_key] = count
    plan.labels = [f"class_{index}" for index in range(count)]
    plan.read.append(f"labels class_0..class_{count - 1} (nothing named them)")
    warning(
        f"nothing names the {count} classes, so they are labelled class_0 ... class_{count - 1}; "
        "give a labels file (one class name a line) to name them"
    )


def _named_labels(sources: ModelSources, config: dict[str, Any] | None, framework: str) -> tuple[list[str] | None, str]:
    if sources.labels is not None:
        try:
            text = sources.labels.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RegistrationError(f"{sources.labels.name}: cannot read: {error}") from None
        return _checked_labels([line.strip() for line in text.splitlines() if line.strip()], sources.labels.name)
    if config is None:
        return None, ""
    name = sources.config.name if sources.config else "config.json"
    if framework == "timm":
        names = config.get("label_names")
        if isinstance(names, list) and names:
            return _checked_labels([str(n) for n in names], f"{name} label_names")
        if isinstance(names, dict) and names:
            return _checked_labels(_by_index(names, f"{name} label_names"), f"{name} label_names")
        return None, ""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None, ""
    ordered = _by_index(id2label, f"{name} id2label")
    if all(_GENERIC_LABEL.fullmatch(label) for label in ordered):
        return None, ""  # transformers' placeholders: nobody named these classes
    return _checked_labels(ordered, f"{name} id2label")


def _by_index(mapping: Mapping[Any, Any], where: str) -> list[str]:
    """The names of ``{index: name}`` in index order; the indices must be 0 .. N-1."""
    try:
        indexed = {int(key): str(value) for key, value in mapping.items()}
    except (TypeError, ValueError):
        raise RegistrationError(f"{where}: keys must be class indices 0, 1, ...") from None
    if sorted(indexed) != list(range(len(indexed))):
        raise RegistrationError(f"{where}: class indices must run from 0 to {len(indexed) - 1} without gaps")
    return [indexed[index] for index in range(len(indexed))]


def _checked_labels(labels: list[str], where: str) -> tuple[list[str], str]:
    labels = [label.strip() for label in labels]
    if any(not label or "\n" in label for label in labels):
        raise RegistrationError(f"{where}: every label must be a non-empty single line")
    twice = [label for label, count in Counter(labels).items() if count > 1]
    if twice:
        raise RegistrationError(f"{where}: labels must be unique; {twice[0]!r} appears more than once")
    return labels, where


# -- building and loading ---------------------------------------------------------------------------------


def _load(plan: _Plan, weights: Weights, file: str) -> nn.Module:
    try:
        model, fit = fit_weights(plan.framework, plan.architecture, plan.model_args, weights.state)
    except ModelLoadError as error:
        raise RegistrationError(str(error)) from None
    if not fit.ok:
        raise RegistrationError(mismatch(plan.target, file, fit, shapes(weights.state), shapes(model.state_dict())))
    classes = num_classes_of(model)
    if classes != len(plan.labels):
        raise RegistrationError(f"{plan.architecture} has {classes} classes but {len(plan.labels)} labels")
    return model.eval()


def _channels(model: nn.Module, plan: _Plan) -> int:
    if plan.framework == "transformers":
        return int(getattr(model, "config").num_channels)  # noqa: B009  (nn.Module's typing hides config)
    from timm.data.model_config import get_model_input_config

    return int(get_model_input_config(model)["input_size"][0])


def _check_forward(model: nn.Module, plan: _Plan, channels: int, height: int, width: int) -> None:
    """One forward pass on a blank input of the preprocessing's output size: the model must take it."""
    try:
        with torch.no_grad():
            logits = logits_of(model(torch.zeros(1, channels, height, width)))
    except (RuntimeError, ValueError, AssertionError, TypeError) as error:
        raise RegistrationError(
            f"{plan.architecture} does not run on {channels}x{height}x{width} inputs, the size the preprocessing "
            f"ends at: {str(error).splitlines()[0].rstrip('.') if str(error) else type(error).__name__}. "
            "Give the input size the model was built for"
        ) from None
    if logits.shape[-1] != len(plan.labels):
        raise RegistrationError(f"{plan.architecture} gives {logits.shape[-1]} logits for {len(plan.labels)} labels")


def _structure(model: nn.Module, plan: _Plan, options: RegisterOptions) -> Structure | None:
    try:
        return describe(model)
    except ValueError as error:  # UnsupportedModelError, or a structure the manifest refuses
        if options.analyses_only:
            return None
        raise RegistrationError(
            f"the class-embedding lens cannot open {plan.architecture}: {error}. To use it in the representation "
            "analyses only, register it with analyses_only (--analyses-only)"
        ) from None


# -- preprocessing ----------------------------------------------------------------------------------------


def _preprocessing(
    plan: _Plan,
    model: nn.Module,
    channels: int,
    config: dict[str, Any] | None,
    weights: Weights,
    sources: ModelSources,
    options: RegisterOptions,
    warning: Callable[[str], None],
) -> tuple[Preprocessing, str]:
    """The model's eval transform, with the options' overrides, and a note of where it came from.

    An explicit resize (and crop) replaces the derived steps; the mean, std and interpolation
    given are used, and those not given come from the derived steps. When those cannot be
    derived (a setting the manifest cannot state), an explicit resize still works if the mean,
    std and interpolation are all given.
    """
    explicit = options.resize is not None or options.crop is not None
    stated = (options.mean, options.std, options.interpolation)
    derived: Preprocessing | None
    try:
        if plan.framework == "transformers":
            derived, where = _hf_preprocessing(plan, model, sources, options, warning)
        else:
            derived, where = _timm_preprocessing(plan, model, channels, config, weights, options)
    except ManifestError as error:
        if not explicit or None in stated:
            hint = "; or state the steps: an explicit resize (and crop) with the mean, std and interpolation"
            raise RegistrationError(f"the preprocessing cannot be stated: {error}{hint}") from None
        derived, where = None, "as given"
    if not explicit:
        assert derived is not None
        return derived, where
    size = options.resize or options.input_size or (derived.output_size if derived else None)
    if size is None:
        raise RegistrationError("an explicit crop needs the resize before it")
    try:
        steps = Preprocessing(
            resize=size,
            resize_mode="exact",
            interpolation=options.interpolation or (derived.interpolation if derived else "bilinear"),
            crop=options.crop,
            mean=options.mean or (derived.mean if derived else ()),
            std=options.std or (derived.std if derived else ()),
            source={"explicit": {"resize": list(size), "crop": list(options.crop) if options.crop else None}},
        )
    except ValidationError as error:
        raise RegistrationError(f"the preprocessing is refused: {describe_validation_error(error)}") from None
    what = "exact resize and centre crop" if options.crop else "exact resize"
    return steps, f"preprocessing: {what} as given, mean and std {where.removeprefix('preprocessing ')}"


def _overridden(options: RegisterOptions) -> list[str]:
    names = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
    return [name for name in names if getattr(options, name) is not None]


def _timm_preprocessing(
    plan: _Plan,
    model: nn.Module,
    channels: int,
    config: dict[str, Any] | None,
    weights: Weights,
    options: RegisterOptions,
) -> tuple[Preprocessing, str]:
    """timm's own resolution of the eval transform for this model, then :func:`from_timm_config`.

    ``resolve_input_data_config`` (not plain ``resolve_data_config``) respects the built
    model's input size, so a model built with ``img_size=32`` is preprocessed for 32x32
    whatever its architecture's default config says.
    """
    args: dict[str, Any] = {key: weights.args[key] for key in _TRAIN_DATA_ARGS if weights.args.get(key)}
    if weights.args.get("model_kwargs"):
        args["model_kwargs"] = weights.args["model_kwargs"]
    overrides = {name: getattr(options, name) for name in _overridden(options) if name != "input_size"}
    args.update(overrides)
    if options.input_size is not None:
        args["input_size"] = (channels, *options.input_size)
        args.pop("img_size", None)
    pretrained_cfg = config.get("pretrained_cfg") if config is not None else None
    if config is not None:
        where = "preprocessing from config.json pretrained_cfg"
    elif weights.args:
        where = "preprocessing from timm's eval transform with the checkpoint's args"
    else:
        where = f"preprocessing from timm's default eval transform of {plan.architecture}"
    try:
        data_config = resolve_input_data_config(model, args=args, pretrained_cfg=pretrained_cfg)
    except (ValueError, AssertionError, TypeError) as error:
        raise RegistrationError(f"timm refuses the preprocessing for {plan.architecture}: {error}") from None
    changed = _overridden(options)
    return from_timm_config(data_config), where + (f", overridden: {', '.join(changed)}" if changed else "")


def _hf_preprocessing(
    plan: _Plan,
    model: nn.Module,
    sources: ModelSources,
    options: RegisterOptions,
    warning: Callable[[str], None],
) -> tuple[Preprocessing, str]:
    """The saved image processor's steps (preprocessor_config.json), or ViT's processor at the model's size."""
    timm_only = [name for name in ("crop_pct", "crop_mode") if getattr(options, name) is not None]
    if timm_only:
        raise RegistrationError(
            f"{' and '.join(timm_only)} are timm settings; a transformers model's preprocessing comes from its "
            "preprocessor_config.json, and an explicit resize (and crop) replaces it"
        )
    if sources.preprocessor_config is not None:
        processor = _read_json(sources.preprocessor_config)
        where = f"preprocessing from {sources.preprocessor_config.name}"
    else:
        size = getattr(model, "config").image_size  # noqa: B009
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        processor = {"image_processor_type": "ViTImageProcessor", "size": {"height": height, "width": width}}
        where = "preprocessing from ViTImageProcessor's defaults at the config's image_size"
        if options.mean is None and options.resize is None:
            warning(
                f"no preprocessor_config.json: assuming ViTImageProcessor's defaults (resize to {height}x{width}, "
                "bilinear, mean and std 0.5); give the mean and std if the model was trained otherwise"
            )
    if options.mean is not None:
        processor["image_mean"] = list(options.mean)
    if options.std is not None:
        processor["image_std"] = list(options.std)
    if options.interpolation is not None:
        processor["resample"] = _PIL_CODES[options.interpolation]
    if options.input_size is not None:
        height, width = options.input_size
        processor["crop_size" if processor.get("do_center_crop") else "size"] = {"height": height, "width": width}
    changed = _overridden(options)
    return from_hf_processor(processor), where + (f", overridden: {', '.join(changed)}" if changed else "")


# -- storing ----------------------------------------------------------------------------------------------


def _store(
    root: Path,
    fields: dict[str, Any],
    plan: _Plan,
    weights: Weights,
    source: Path,
    options: RegisterOptions,
) -> ModelEntry:
    """Hand the manifest, labels and weights (as safetensors) to ``add_model``, which checks the stored copy loads."""
    details: dict[str, Any] = {"source_file": source.name}
    made_root = not root.exists()
    work = Path(tempfile.mkdtemp(prefix=".registering-", dir=_mkdirs(root)))
    try:
        if weights.plain:
            stored = source
        else:
            stored = work / "model.safetensors"
            details.update(
                {
                    "source_sha256": sha256_of(source),
                    "source_kind": weights.kind,
                    **({"source_entry": weights.entry} if weights.entry else {}),
                    **({"removed_prefix": "".join(weights.removed)} if weights.removed else {}),
                }
            )
            save_file(_storable(weights.state), str(stored), metadata={"format": "pt"})
        return add_model(
            root,
            fields,
            stored,
            plan.labels,
            overwrite=options.overwrite,
            check=load_model,
            weights_details=details,
        )
    except ManifestError as error:
        raise RegistrationError(f"the manifest is refused: {error}") from None
    except FileExistsError as error:
        raise RegistrationError(str(error)) from None
    except (ModelLoadError, ArtifactError) as error:
        raise RegistrationError(f"the stored copy does not load: {error}") from None
    except OSError as error:
        raise RegistrationError(f"cannot write the model into {root}: {error}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_root and not any(root.iterdir()):
            root.rmdir()  # made for this model, which did not take its place


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _storable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, and copies where several share one storage (tied weights)."""
    storages: dict[int, int] = {}
    for tensor in state.values():
        pointer = tensor.untyped_storage().data_ptr()
        storages[pointer] = storages.get(pointer, 0) + 1
    return {
        key: (tensor.clone() if storages[tensor.untyped_storage().data_ptr()] > 1 else tensor).contiguous()
        for key, tensor in state.items()
    }


def _weights_note(weights: Weights, file: str) -> str:
    what = f"{weights.entry} of {file}" if weights.entry else file
    if weights.epoch is not None:
        what += f" (epoch {weights.epoch})"
    if weights.removed:
        what += f", {' and '.join(repr(p) for p in weights.removed)} removed from every key"
    return f"weights: {what}" + ("" if weights.plain else ", stored as safetensors")


def _recipe(weights: Weights, file: str) -> str:
    if weights.kind == "timm train.py checkpoint":
        epoch = f", epoch {weights.epoch}" if weights.epoch is not None else ""
        return f"timm train.py ({file}{epoch}); registered with classlens"
    return f"unknown; registered with classlens from {file}"


# -- saying why weights do not fit ------------------------------------------------------------------------


def _unknown_classes(plan: _Plan, weights: Weights, count_key: str) -> str:
    """Why the class count cannot be read: the head is missing, or the weights are another model's.

    The second is told apart by building the architecture with any class count (two) and
    comparing everything but the head: a checkpoint of another kind of model gets the
    mismatch paragraph, which names the real problem, rather than a request for labels.
    """
    head = (plan.head_key or "").removesuffix(".weight")
    probe = None
    if plan.framework == "timm":  # transformers' file keys are renamed on loading: no key-by-key comparison
        with contextlib.suppress(ModelLoadError):
            probe = build_model(plan.framework, plan.architecture, {**plan.model_args, count_key: 2})
    if probe is not None:
        body = {key: shape for key, shape in shapes(probe.state_dict()).items() if not key.startswith(f"{head}.")}
        found = {key: shape for key, shape in shapes(weights.state).items() if not key.startswith(f"{head}.")}
        fit = Fit(
            missing=[key for key in body if key not in found],
            unexpected=[key for key in found if key not in body],
            mismatched=[
                (key, found[key], shape) for key, shape in body.items() if key in found and found[key] != shape
            ],
        )
        if not fit.ok:
            return mismatch(plan.target, weights.file, fit, found, body)
    return (
        f"cannot tell the classes: nothing names the labels and the checkpoint has no {plan.head_key} "
        "to count them from. Give a labels file, one class name a line"
    )
