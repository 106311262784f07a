"""The timm ``VisionTransformer`` family (DeiT's distilled models and register tokens included).

:func:`inspect_vit` reads the shape of a timm ViT and refuses what the lens cannot
explain, with the reason; :class:`TimmViT` is the family's :class:`~worker.lens.adapter.LensModel`.
The representation analyses open timm ViTs directly (their hooks need timm's ``Block`` or ``ResPostBlock``
and ``Attention``), so they call :func:`inspect_vit`, :func:`trace` and
:func:`materialised_attention` of this module.

Which final norm the projection applies (docs/methods.md, "Notation" and "Final norm before
pooling"): timm builds at most one of ``model.norm`` (on every token, before pooling)
and ``model.fc_norm`` (on the pooled vector). CLS models normally have ``norm``, GAP
models ``fc_norm``; ``fc_norm=False`` on a GAP model (``vit_base_patch16_gap_224``) keeps
``norm`` before the mean, and ``fc_norm=True`` on a CLS model moves it after the token
is read. The lens applies whichever the model applies, where the model applies it, so
the last layer's pooled projection is the model's logits.

Two kinds of block (docs/methods.md, "Notation"):
timm's pre-norm ``Block``, ``a_b = ls1(attn(norm1(x)))`` and ``m_b = ls2(mlp(norm2(x')))``,
and the post-norm ``ResPostBlock`` (``vit_base_patch16_rpn_224``), ``x' = x + norm1(attn(x))``
and ``x_b = x' + norm2(mlp(x'))``. For a post-norm block the lens takes ``a_b = norm1(attn(x))``
and ``m_b = norm2(mlp(x'))``, the paper's convention (the block's own norm applied to the
sublayer output before it is projected): they are exactly what each residual addition adds,
so ``x_b = x_{b-1} + a_b + m_b`` holds for both kinds, and the projection, ranks, maps and
gradient map need nothing else. All blocks of a model are of one kind (``ViTSpec.post_norm``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, cast

import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from worker.lens.adapter import (
    LensModel,
    Pooling,
    Readout,
    TensorSink,
    Trace,
    UnsupportedModelError,
    ViTSpec,
    hooked,
    linear_head,
    pair,
    save_as_leaf,
    save_output,
)

__all__ = [
    "TimmViT",
    "Trace",
    "UnsupportedModelError",
    "ViTSpec",
    "attention_of",
    "block_sublayers",
    "blocks_of",
    "branches_of",
    "final_norm_of",
    "hooked",
    "inspect_vit",
    "materialised",
    "materialised_attention",
    "save_as_leaf",
    "timm_problems",
    "trace",
]

# The blocks the lens reads: pre-norm and post-norm (the module docstring).
BLOCKS: tuple[type[nn.Module], ...] = (Block, ResPostBlock)
ViTBlock = Block | ResPostBlock

# timm's global_pool values whose read-out is a fixed reduction of the tokens.
POOLINGS: tuple[Pooling, ...] = ("token", "avg", "max", "avgmax")
REFUSED_POOLINGS = {
    "map": "an attention-pooling read-out, a learned attention over the tokens, so no token's "
    "projection corresponds to the logits",
    "": "no pooling: the model returns per-token outputs, not one classification",
}


def pooling_of(global_pool: str) -> Pooling:
    """timm's ``global_pool`` as a :data:`Pooling`, or the refusal naming why the lens cannot read it."""
    if global_pool in POOLINGS:
        return global_pool  # narrowed to a Pooling by the membership test
    reason = REFUSED_POOLINGS.get(global_pool, "a read-out the lens does not know")
    raise UnsupportedModelError(
        f"unsupported read-out: global_pool {global_pool!r} is {reason} (supported: {', '.join(POOLINGS)})"
    )


def final_norm_of(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(F, norm_before_pool)`` of a timm model that has ``norm`` and ``fc_norm`` (ViT, Eva)."""
    norm, fc_norm = cast(nn.Module, model.norm), cast(nn.Module, model.fc_norm)
    if not isinstance(norm, nn.Identity) and not isinstance(fc_norm, nn.Identity):
        raise UnsupportedModelError("the model applies both a final norm and an fc_norm; the lens expects one")
    if isinstance(norm, nn.Identity):
        return fc_norm, False
    return norm, True


def timm_problems(
    model: nn.Module, block_classes: Sequence[type[nn.Module]], attention_class: type[nn.Module]
) -> list[str]:
    """What keeps the lens from a timm ViT-like model (``VisionTransformer``, ``Eva``), each with its reason.

    ``block_classes`` are the kinds of block the family's adapter reads; every block must be
    of the first block's kind.
    """
    problems = []
    attention_pool = getattr(model, "attn_pool", None) is not None
    if attention_pool or model.global_pool not in POOLINGS:
        try:
            pooling_of("map" if attention_pool else cast(str, model.global_pool))
        except UnsupportedModelError as error:
            problems.append(str(error).removeprefix("unsupported read-out: "))
    if not isinstance(model.head, nn.Linear):
        problems.append("a head that is not one linear layer (the class embeddings are a linear head's rows)")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic image size (the grid must be fixed by the manifest's input size)")
    blocks = list(cast(nn.ModuleList, model.blocks))
    for index, block in enumerate(blocks):
        if type(block) not in block_classes or type(block.attn) is not attention_class:
            names = " or ".join(cls.__name__ for cls in block_classes)
            problems.append(
                f"block {index} is {type(block).__name__}, not a {names} with {attention_class.__name__} (the "
                "lens reads a_b and m_b where those blocks add them, so that x_b = x_(b-1) + a_b + m_b; other "
                "blocks, such as post-norm or parallel ones of another family, break it)"
            )
            break
        if type(block) is not type(blocks[0]):
            problems.append(
                f"block {index} is {type(block).__name__} but block 0 is {type(blocks[0]).__name__}: "
                "the lens reads models whose blocks are all of one kind"
            )
            break
    return problems


def inspect_vit(model: nn.Module) -> ViTSpec:
    """Read the number of prefix tokens, the grid and the rest from ``model``; refuse what we cannot explain."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer; the class-embedding lens needs one"
        )
    problems = timm_problems(model, BLOCKS, Attention)
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
    grid = pair(model.patch_embed.grid_size)
    return ViTSpec(
        prefix_tokens=tuple(prefix),
        grid=grid,
        patch_size=pair(model.patch_embed.patch_size),
        depth=len(model.blocks),
        width=int(model.embed_dim),
        num_classes=int(model.num_classes),
        num_heads=int(cast(Attention, model.blocks[0].attn).num_heads),
        pooling=pooling_of(model.global_pool),
        post_norm=isinstance(model.blocks[0], ResPostBlock),
    )


def blocks_of(model: VisionTransformer) -> list[ViTBlock]:
    """The model's blocks, typed (``inspect_vit`` has checked that they are timm ``Block``s or ``ResPostBlock``s)."""
    return cast(list[ViTBlock], list(model.blocks))


def attention_of(block: ViTBlock) -> Attention:
    return cast(Attention, block.attn)


def branches_of(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are ``a_b`` and ``m_b``, the last module of each branch before its addition.

    Pre-norm: the layer scales ``ls1``, ``ls2``. Post-norm: ``drop_path1``, ``drop_path2``
    (the identity in eval mode, each block's own instance), whose inputs are
    ``norm1(attn(x))`` and ``norm2(mlp(x'))``: the sublayer outputs through the block's norm.
    """
    if isinstance(block, ResPostBlock):
        return cast(nn.Module, block.drop_path1), cast(nn.Module, block.drop_path2)
    return cast(nn.Module, block.ls1), cast(nn.Module, block.ls2)


def block_sublayers(block: ViTBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_b, m_b)`` of a block on its input ``x``, computed without hooks (for graph export; eval mode).

    The block's output is ``x + a_b + m_b``; the module docstring has the two conventions.
    """
    if isinstance(block, ResPostBlock):
        a = block.norm1(block.attn(x))
        return a, block.norm2(block.mlp(x + a))
    a = block.ls1(block.attn(block.norm1(x)))
    return a, block.ls2(block.mlp(block.norm2(x + a)))


@contextmanager
def materialised(attentions: Sequence[nn.Module], store: TensorSink, as_leaves: bool = False) -> Iterator[None]:
    """Record the attention probabilities of timm attention modules (``Attention``, ``EvaAttention``).

    timm's fused attention (``scaled_dot_product_attention``) never forms the
    probabilities, so it is switched off for the pass and restored afterwards;
    the unfused path computes the same outputs, and ``attn_drop`` (the identity
    in eval mode) receives exactly ``softmax(q k^T * scale)``. ``as_leaves``
    makes each ``A_b`` a leaf that requires grad, so that gradients can be taken
    with respect to it whatever the parameters' ``requires_grad`` (``store`` must
    then be a list). A ``store`` that reduces each tensor as it arrives keeps no
    attention maps at all.
    """
    if as_leaves:
        assert isinstance(store, list), "leaves are kept for autograd: pass a list"
        hook: Any = save_as_leaf(store)
    else:
        hook = save_output(store)
    with unfused_attention(attentions, hook):
        yield


@contextmanager
def unfused_attention(attentions: Sequence[nn.Module], hook: Any) -> Iterator[None]:
    """Run timm attention modules unfused, with ``hook`` on each ``attn_drop`` (it sees, or replaces, ``A_b``).

    timm's fused attention never forms the probabilities; the unfused path computes the same
    outputs and hands ``softmax(q k^T * scale)`` to ``attn_drop`` (the identity in eval mode).
    The flags and hooks are restored whatever happens.
    """
    saved = [attention.fused_attn for attention in attentions]
    with ExitStack() as stack:
        for attention in attentions:
            # fused_attn is a torch.jit.Final flag; in eager mode it is read on every call.
            setattr(attention, "fused_attn", False)  # noqa: B010  (an nn.Module attribute mypy cannot see)
            stack.enter_context(hooked(cast(nn.Module, attention.attn_drop), hook))
        try:
            yield
        finally:
            for attention, fused in zip(attentions, saved, strict=True):
                setattr(attention, "fused_attn", fused)  # noqa: B010


def materialised_attention(
    model: VisionTransformer, store: TensorSink, as_leaves: bool = False
) -> AbstractContextManager[None]:
    """Every block's attention probabilities ``A_b`` (``[B, H, T, T]``) of a timm ViT: see :func:`materialised`."""
    return materialised([attention_of(block) for block in blocks_of(model)], store, as_leaves)


class TimmViT(LensModel):
    """A timm ``VisionTransformer``: every pooling with a fixed read-out, either norm placement,
    DeiT's distillation head, register tokens, pre-norm or post-norm blocks."""

    family = "timm-vit"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.spec = inspect_vit(model)
        vit = cast(VisionTransformer, model)
        self.final_norm, before = final_norm_of(vit)
        # Reading one token commutes with a per-token norm: normalise the one token, not all of them.
        self.norm_before_pool = before and self.spec.pooling != "token"
        start = 0 if getattr(vit, "pool_include_prefix", False) else self.spec.num_prefix
        pooling = self.spec.pooling
        readouts = [Readout(linear_head(vit.head, "the head"), pooling, token=0, start=start)]
        if isinstance(vit, VisionTransformerDistilled):
            readouts.append(Readout(linear_head(vit.head_dist, "the distillation head"), "token", token=1))
        self.readouts = tuple(readouts)
        self.input_shape = (int(vit.patch_embed.proj.in_channels), *pair(vit.patch_embed.img_size))

    def blocks(self) -> list[ViTBlock]:
        return blocks_of(cast(VisionTransformer, self.model))

    def branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return branches_of(block)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        model = cast(VisionTransformer, self.model)
        return model.forward_head(model.forward_features(images))

    def attention_probabilities(self, store: TensorSink, as_leaves: bool = False) -> AbstractContextManager[None]:
        return materialised_attention(cast(VisionTransformer, self.model), store, as_leaves)


def trace(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sublayers: bool = True,
    attention_probs: bool = False,
    for_attention_gradients: bool = False,
) -> Trace:
    """:meth:`LensModel.trace` of a timm ViT (the analyses' entry point; the lens opens any family)."""
    return TimmViT(model).trace(
        images,
        sublayers=sublayers,
        attention_probs=attention_probs,
        for_attention_gradients=for_attention_gradients,
    )
