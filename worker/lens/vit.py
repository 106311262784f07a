"""What the lens needs to know about a timm Vision Transformer, and one traced forward pass.

Notation follows METHODS.md ("Notation"): ``P`` prefix tokens, ``N = h*w`` image
tokens, ``L`` pre-norm blocks with ``x' = x + a_b`` and ``x_b = x' + m_b``.

:func:`trace` runs the model once. The residual stream ``x_1 .. x_L`` comes from
timm's own ``forward_intermediates`` and the logits from ``forward_head``; hooks
are used only for what timm does not return (``x_0``, the sublayer outputs
``a_b = ls1(attn(norm1(x)))`` and ``m_b = ls2(mlp(norm2(x')))``, and attention
probabilities) and are always removed, even when the pass fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

if TYPE_CHECKING:  # the projection imports this module
    from worker.lens.projection import StreamLogits


class UnsupportedModelError(ValueError):
    """The model is not a ViT the lens knows how to open up."""


@dataclass(frozen=True)
class ViTSpec:
    """The shape of a supported ViT, read from the model itself."""

    prefix_tokens: tuple[str, ...]  # names in sequence order: "cls", "dist", "reg0", ...
    grid: tuple[int, int]  # (h, w) image tokens
    patch_size: tuple[int, int]  # pixels per patch (height, width)
    depth: int  # L
    width: int  # D
    num_classes: int  # C
    num_heads: int
    pooling: Literal["token", "avg"]

    @property
    def num_prefix(self) -> int:
        return len(self.prefix_tokens)

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def inspect_vit(model: nn.Module) -> ViTSpec:
    """Read the number of prefix tokens, the grid and the rest from ``model``; refuse what we cannot explain."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer; the class-embedding lens needs one"
        )
    problems = []
    if model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool {model.global_pool!r} (supported: 'token', 'avg')")
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attention pooling head")
    if not isinstance(model.head, nn.Linear):
        problems.append("a head that is not one linear layer")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic image size")
    for index, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            problems.append(f"block {index} is {type(block).__name__}, not a pre-norm timm Block with Attention")
            break
    if problems:
        raise UnsupportedModelError("unsupported ViT: " + "; ".join(problems))

    prefix: list[str] = []
    if model.cls_token is not None:
        prefix.append("cls")
    if isinstance(model, VisionTransformerDistilled):
        prefix.append("dist")
    prefix += [f"reg{i}" for i in range(getattr(model, "num_reg_tokens", 0))]
    if len(prefix) != model.num_prefix_tokens:
        raise UnsupportedModelError(f"cannot name the {model.num_prefix_tokens} prefix tokens of this model")
    grid = tuple(model.patch_embed.grid_size)
    return ViTSpec(
        prefix_tokens=tuple(prefix),
        grid=(int(grid[0]), int(grid[1])),
        patch_size=(int(model.patch_embed.patch_size[0]), int(model.patch_embed.patch_size[1])),
        depth=len(model.blocks),
        width=int(model.embed_dim),
        num_classes=int(model.num_classes),
        num_heads=int(cast(Attention, model.blocks[0].attn).num_heads),
        pooling="token" if model.global_pool == "token" else "avg",
    )


def blocks_of(model: VisionTransformer) -> list[Block]:
    """The model's blocks, typed (``inspect_vit`` has checked that they are timm ``Block``s)."""
    return cast(list[Block], list(model.blocks))


def attention_of(block: Block) -> Attention:
    return cast(Attention, block.attn)


@dataclass
class Trace:
    """Everything one forward pass exposes, for a batch of ``B`` images.

    ``T = P + N`` tokens. Block ``b`` (1-based in METHODS.md) is index ``b - 1``
    of ``attention`` and ``mlp``, and index ``b`` of ``residual`` (index 0 is ``x_0``).
    """

    logits: torch.Tensor  # [B, C], the model's own output
    residual: torch.Tensor  # [B, L + 1, T, D]: x_0 .. x_L, before the final norm
    attention: torch.Tensor | None  # [B, L, T, D]: a_b, or None if not asked for
    mlp: torch.Tensor | None  # [B, L, T, D]: m_b
    attention_probs: list[torch.Tensor] | None  # L x [B, H, T, T]
    # An ONNX explainer graph projects in the graph (worker.onnx_export.ExplainerGraph) and returns,
    # instead of the sublayers, E_c v of every stream (a worker.lens.projection.StreamLogits) and
    # the norm's scale s(v) of every stream, [B, S, T] in the order x, a, m.
    centred: StreamLogits | None = None
    scales: torch.Tensor | None = None


class TensorSink(Protocol):
    """Where hooks put what they capture: a list, or anything that reduces tensors as they come."""

    def append(self, tensor: torch.Tensor, /) -> None: ...


def _save_output(store: TensorSink) -> Callable[[nn.Module, Any, torch.Tensor], None]:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        store.append(output)

    return hook


@contextmanager
def hooked(module: nn.Module, hook: Callable[..., Any], *, pre: bool = False) -> Iterator[None]:
    """A forward (or forward-pre) hook that is removed on leaving the block, whatever happens."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def save_as_leaf(store: list[torch.Tensor]) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    """A forward hook that swaps the module's output for a leaf requiring grad, and keeps it.

    The rest of the pass is built on the leaf, so gradients with respect to it
    exist even when no parameter requires grad.
    """

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        return leaf

    return hook


@contextmanager
def materialised_attention(model: VisionTransformer, store: TensorSink, as_leaves: bool = False) -> Iterator[None]:
    """Record every block's attention probabilities ``A_b`` (``[B, H, T, T]``).

    timm's fused attention (``scaled_dot_product_attention``) never forms the
    probabilities, so it is switched off for the pass and restored afterwards;
    the unfused path computes the same outputs, and ``attn_drop`` (the identity
    in eval mode) receives exactly ``softmax(q k^T * scale)``. ``as_leaves``
    makes each ``A_b`` a leaf that requires grad, so that gradients can be taken
    with respect to it whatever the parameters' ``requires_grad`` (``store`` must
    then be a list). A ``store`` that reduces each tensor as it arrives keeps no
    attention maps at all.
    """
    attentions = [attention_of(block) for block in blocks_of(model)]
    saved = [attention.fused_attn for attention in attentions]
    if as_leaves:
        assert isinstance(store, list), "leaves are kept for autograd: pass a list"
        hook: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None] = save_as_leaf(store)
    else:
        hook = _save_output(store)
    with ExitStack() as stack:
        for attention in attentions:
            # fused_attn is a torch.jit.Final flag; in eager mode it is read on every call.
            attention.fused_attn = False  # type: ignore[misc]
            stack.enter_context(hooked(attention.attn_drop, hook))
        try:
            yield
        finally:
            for attention, fused in zip(attentions, saved, strict=True):
                attention.fused_attn = fused  # type: ignore[misc]


def trace(
    model: VisionTransformer,
    images: torch.Tensor,
    *,
    sublayers: bool = True,
    attention_probs: bool = False,
    for_attention_gradients: bool = False,
) -> Trace:
    """One forward pass with the residual stream, sublayer outputs and (optionally) attention probabilities.

    ``for_attention_gradients`` makes every ``A_b`` a leaf that requires grad and
    cuts the graph between blocks (each block's input is detached), so that a
    loss computed from block ``b``'s output has gradients with respect to
    ``A_b`` only through block ``b``: the gradient relevance map needs exactly that.
    """
    spec = inspect_vit(model)
    embedded: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    mlp: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    with ExitStack() as stack:
        stack.enter_context(hooked(model.norm_pre, _save_output(embedded)))
        if sublayers:
            for block in blocks_of(model):
                stack.enter_context(hooked(block.ls1, _save_output(attention)))
                stack.enter_context(hooked(block.ls2, _save_output(mlp)))
        if attention_probs or for_attention_gradients:
            stack.enter_context(materialised_attention(model, probs, as_leaves=for_attention_gradients))
        if for_attention_gradients:
            for block in blocks_of(model):
                stack.enter_context(hooked(block, _detach_input, pre=True))
        outputs = model.forward_intermediates(
            images, output_fmt="NLC", return_prefix_tokens=spec.num_prefix > 0, norm=False
        )
        final, intermediates = cast(tuple[torch.Tensor, list[Any]], outputs)
        logits = model.forward_head(final)
    if spec.num_prefix:
        blocks_out = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in intermediates]
    else:
        blocks_out = list(intermediates)
    return Trace(
        logits=logits,
        residual=torch.stack([embedded[0], *blocks_out], dim=1),
        attention=torch.stack(attention, dim=1) if sublayers else None,
        mlp=torch.stack(mlp, dim=1) if sublayers else None,
        attention_probs=probs or None,
    )


def _detach_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].detach(), *args[1:])
