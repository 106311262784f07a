"""Why weights do not fit the model they were registered as: one short paragraph, never a key dump.

The paragraph gives the counts of missing and unexpected keys and shape mismatches, the
first few of each (:class:`worker.model_loader.Fit`), and the likely cause read from the
shapes: another width, depth, patch size, channel count, image size or class count than
the model was built with (with the timm name of the size the checkpoint looks like), keys
of the other framework, or a wrapper's prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import timm
import torch

from worker.model_loader import SHOWN_KEYS, Fit, Shape

# timm's ViT widths by model size, to suggest the size a checkpoint was trained at.
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


@dataclass(frozen=True)
class Target:
    """The model the weights were meant for: what the paragraph names."""

    framework: str
    architecture: str
    head_key: str | None


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, Shape]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def mismatch(target: Target, file: str, fit: Fit, found: Mapping[str, Shape], wanted: Mapping[str, Shape]) -> str:
    """One paragraph: the counts, a few keys of each kind, and the likely cause."""
    causes = "; ".join(_causes(target, found, wanted)[:3])
    end = "" if causes.endswith(("?", ".")) else "."
    return f"The weights do not fit {target.architecture} ({file}): {fit.describe()}. Likely cause: {causes}{end}"


def _causes(target: Target, found: Mapping[str, Shape], wanted: Mapping[str, Shape]) -> list[str]:
    keys = list(found)
    foreign = _foreign_keys(target, keys)
    if foreign is not None:
        return [foreign]
    mine, theirs = _top_modules(list(wanted)), _top_modules(keys)
    if not mine & theirs:
        if len(theirs) == 1:
            [prefix] = theirs
            return [
                f"every key in the file starts with '{prefix}.', which {target.architecture} has no part named; "
                "it was saved from a wrapper around the model: save the inner model's state_dict()"
            ]
        shown = ", ".join(sorted(theirs)[:SHOWN_KEYS])
        return [
            f"the file's top-level modules ({shown}) share nothing with {target.architecture}'s; it was saved from "
            "another kind of model"
        ]
    timm_names = target.framework == "timm"
    causes = []
    width_found, width_wanted = _width(found), _width(wanted)
    if width_found and width_wanted and width_found != width_wanted:
        name = "embed_dim" if timm_names else "hidden_size"
        cause = f"{name} {width_found} in the checkpoint vs {width_wanted} in {target.architecture}"
        suggestion = _size_suggestion(target.architecture, width_found, width_wanted) if timm_names else None
        causes.append(cause + (f": did you mean {suggestion}?" if suggestion else ""))
    depth_found, depth_wanted = _depth(found), _depth(wanted)
    if depth_found and depth_wanted and depth_found != depth_wanted:
        name = "depth" if timm_names else "num_hidden_layers"
        causes.append(f"the checkpoint has {depth_found} blocks, the model {depth_wanted}: set {name} to {depth_found}")
    patch_found, patch_wanted = _patch(found), _patch(wanted)
    if patch_found and patch_wanted:
        if patch_found[0] != patch_wanted[0]:
            name = "in_chans" if timm_names else "num_channels"
            causes.append(f"{name} {patch_found[0]} in the checkpoint vs {patch_wanted[0]} in the model")
        if patch_found[1:] != patch_wanted[1:]:
            size = "x".join(str(n) for n in patch_found[1:])
            causes.append(f"patch size {size} in the checkpoint vs {'x'.join(str(n) for n in patch_wanted[1:])}")
    tokens_found, tokens_wanted = _tokens(found), _tokens(wanted)
    if tokens_found and tokens_wanted and tokens_found != tokens_wanted and len(causes) < 2:
        name = "img_size" if timm_names else "image_size"
        causes.append(
            f"the checkpoint's position embedding holds {tokens_found} tokens, the model's {tokens_wanted}: "
            f"the image size differs (set {name} to the one it was trained at)"
        )
    head_key = target.head_key or ""
    if head_key in found and head_key in wanted and found[head_key][0] != wanted[head_key][0]:
        name = "num_classes" if timm_names else "num_labels"
        causes.append(
            f"the checkpoint's head has {found[head_key][0]} classes but the model {wanted[head_key][0]} ({name})"
        )
    return causes or [
        f"the file was saved from another architecture than {target.architecture}, or with other model_args"
    ]


def _foreign_keys(target: Target, keys: Sequence[str]) -> str | None:
    """Why the keys belong to the other framework's models, if they do."""
    if target.framework == "timm" and _looks_transformers(keys):
        return (
            "these keys look like a Hugging Face transformers checkpoint; register the folder save_pretrained "
            "wrote (with its config.json) instead of naming a timm architecture"
        )
    if target.framework == "transformers" and _looks_timm(keys):
        return "these keys look like a timm checkpoint; register it with its timm architecture name instead"
    return None


def _looks_transformers(keys: Sequence[str]) -> bool:
    return any(re.match(r"(vit|deit)\.(embeddings|encoder|layers)\.", key) for key in keys)


def _looks_timm(keys: Sequence[str]) -> bool:
    return any(key.startswith("blocks.0.") for key in keys) and any(key.startswith("patch_embed.") for key in keys)


def _top_modules(keys: Sequence[str]) -> set[str]:
    return {key.split(".", 1)[0] for key in keys}


def _find(shapes: Mapping[str, Shape], *suffixes: str) -> Shape | None:
    return next((shape for key, shape in shapes.items() if key.endswith(suffixes)), None)


def _width(shapes: Mapping[str, Shape]) -> int | None:
    """The model width ``D``: the last dimension of the CLS token or the position embedding (GAP models have no CLS)."""
    shape = _find(shapes, "cls_token", "pos_embed", "position_embeddings")
    return shape[-1] if shape else None


def _depth(shapes: Mapping[str, Shape]) -> int | None:
    indices = [int(m.group(1)) for key in shapes if (m := re.search(r"(?:^|\.)(?:blocks|layers|layer)\.(\d+)\.", key))]
    return max(indices) + 1 if indices else None


def _patch(shapes: Mapping[str, Shape]) -> Shape | None:
    shape = _find(shapes, "patch_embed.proj.weight", "patch_embeddings.projection.weight")
    return shape[1:] if shape and len(shape) == 4 else None


def _tokens(shapes: Mapping[str, Shape]) -> int | None:
    shape = _find(shapes, "pos_embed", "position_embeddings")
    return shape[1] if shape and len(shape) == 3 else None


def _size_suggestion(architecture: str, width_found: int, width_wanted: int) -> str | None:
    """``vit_small_patch16_224`` for a 384-wide checkpoint given ``vit_base_patch16_224``, if timm has it."""
    size_found, size_wanted = _VIT_SIZES.get(width_found), _VIT_SIZES.get(width_wanted)
    if size_found is None:
        return None
    if size_wanted and f"_{size_wanted}" in architecture:
        candidate = architecture.replace(f"_{size_wanted}", f"_{size_found}", 1)
        if timm.is_model(candidate):
            return candidate
    return f"a {size_found} model (width {width_found})"
