"""Per-layer features of any timm model, layer by layer as the pass produces them (docs/methods.md,
"What is compared").

Vision Transformers (timm ``VisionTransformer``): the residual stream after every block,
``x_1 .. x_L`` (layer ``"block b"``), read by a forward hook on each block as the block
returns it, before the final norm, exactly as :func:`worker.lens.vit.trace` returns it.
Other timm models (CNNs such as ResNet): the feature maps of timm's
``forward_intermediates`` (for a ResNet the stem and every stage), named after the
modules of ``model.feature_info``.

A layer's raw output (``[B, T, D]`` tokens or a ``[B, C, H, W]`` map) is reduced to one
row per image by :func:`reduce`:

- ``"tokens"`` (default): all tokens flattened, ``T * D`` per image (prefix tokens
  included); for a CNN the flattened map, ``C * H * W``;
- ``"cls"``: the first prefix token (the CLS token); refused for models without one and CNNs;
- ``"gap"``: the mean of the ``N`` image tokens; for a CNN the global average of the map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.vit import hooked

Representation = Literal["tokens", "cls", "gap"]
REPRESENTATIONS: tuple[Representation, ...] = ("tokens", "cls", "gap")
LayerSink = Callable[[str, torch.Tensor], None]  # (layer name, raw layer output of the batch)


class RepresentationError(ValueError):
    """A representation the model does not have (CLS of a CNN, say), or a model we cannot open up."""


@dataclass(frozen=True)
class LayerSpec:
    """What a model's layers look like, for naming and reducing them."""

    kind: Literal["vit", "cnn"]
    names: tuple[str, ...]
    num_prefix: int = 0  # ViT prefix tokens (CLS, distillation, registers)
    grid: tuple[int, int] | None = None  # ViT image-token grid (h, w)


def describe(model: nn.Module) -> LayerSpec:
    """The layers :func:`run_layers` reports for ``model``, in order."""
    if isinstance(model, VisionTransformer):
        grid = model.patch_embed.grid_size
        return LayerSpec(
            kind="vit",
            names=tuple(f"block {b}" for b in range(1, len(model.blocks) + 1)),
            num_prefix=int(model.num_prefix_tokens),
            grid=(int(grid[0]), int(grid[1])),
        )
    if not callable(getattr(model, "forward_intermediates", None)):
        raise RepresentationError(f"{type(model).__name__} has no forward_intermediates: its layers cannot be read")
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        raise RepresentationError(f"{type(model).__name__} has no feature_info to name its layers")
    return LayerSpec(kind="cnn", names=tuple(str(entry.get("module", f"stage {i}")) for i, entry in enumerate(info)))


def check_representation(spec: LayerSpec, representation: str) -> None:
    if representation not in REPRESENTATIONS:
        raise RepresentationError(f"unknown representation {representation!r}; choose from {list(REPRESENTATIONS)}")
    if representation == "cls" and (spec.kind == "cnn" or not spec.num_prefix):
        what = "a CNN" if spec.kind == "cnn" else "this ViT (no prefix tokens)"
        raise RepresentationError(f"{what} has no CLS token: use 'tokens' or 'gap'")


def reduce(features: torch.Tensor, representation: Representation, spec: LayerSpec) -> torch.Tensor:
    """One row per image, ``[B, p]``, of a layer's raw output (see the module docstring)."""
    if representation == "tokens":
        return features.reshape(features.shape[0], -1)
    if spec.kind == "cnn":
        if representation == "gap":
            return features.reshape(features.shape[0], features.shape[1], -1).mean(dim=-1)
        raise RepresentationError("a CNN has no CLS token")
    if representation == "cls":
        if not spec.num_prefix:
            raise RepresentationError("this ViT has no prefix token")
        return features[:, 0]
    return features[:, spec.num_prefix :].mean(dim=1)


@contextmanager
def _block_outputs(model: VisionTransformer, sink: LayerSink, names: tuple[str, ...]) -> Iterator[None]:
    def hook_for(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            sink(name, output)

        return hook

    with ExitStack() as stack:
        for name, block in zip(names, model.blocks, strict=True):
            stack.enter_context(hooked(block, hook_for(name)))
        yield


def run_layers(model: nn.Module, images: torch.Tensor, sink: LayerSink, spec: LayerSpec | None = None) -> torch.Tensor:
    """Run ``model`` once on ``images``, handing every layer's raw output to ``sink`` as it is produced.

    Returns the model's logits. No layer output is kept here: what ``sink`` keeps is up to it.
    """
    spec = spec or describe(model)
    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            with _block_outputs(model, sink, spec.names):
                return cast(torch.Tensor, model(images))
        network: Any = model  # a timm model with forward_intermediates / forward_head (describe() checked)
        final, intermediates = network.forward_intermediates(images)
        if len(intermediates) != len(spec.names):
            raise RepresentationError(f"{len(intermediates)} intermediates but {len(spec.names)} named layers")
        for name, features in zip(spec.names, intermediates, strict=True):
            sink(name, features)
        return cast(torch.Tensor, network.forward_head(final))
