"""Attention and context perturbations and what they do to class identifiability (docs/methods.md,
"Attention perturbation", "Context perturbation").

- ``self-only``: in every block, image tokens attend only to themselves;
- ``no-cls``: in every block, image tokens cannot attend to the prefix tokens (CLS,
  distillation, registers);
- ``context``: the image tokens of a grid region are dropped from the sequence after the
  position embedding (the model never sees them; the others keep their position codes).

The attention perturbations mask the attention of image-token queries (prefix-token
queries attend as usual); the mask reaches every block's attention through a forward
pre-hook that sets its ``attn_mask`` argument (fused and unfused attention honour it alike),
and the context perturbation keeps its tokens with :func:`worker.lens.tokens.dropped_tokens`
(a forward hook on ``patch_drop``: the token removal of the faithfulness protocol). Both
hooks are removed whatever happens. Each perturbed pass is one
:func:`worker.lens.vit.trace`, so every layer's residual stream comes from the same pass.

The figure of merit is, per layer ``0 .. L``, the mean over images of the mean
identifiability ``1 - rank / C`` (:mod:`worker.lens.ranks`) of the target class over image
tokens, projected with the paper's fresh-statistics final norm and the head bias. The
target is the true class when labels are given, else the unperturbed model's prediction.
For ``context`` both the perturbed and the unperturbed pass are averaged over the kept
tokens only, so that the two curves describe the same tokens.

How ``no-cls`` removes the prefix keys (``NoClsConvention``): ``pre_softmax`` (the default)
masks them before the softmax, so each image query's weights over the image keys sum to 1;
``zero_renormalised`` zeroes them after the softmax and divides each row by what is left,
which is the same distribution written the other way (it differs from ``pre_softmax`` by
rounding only); ``zero`` zeroes them after the softmax and does not renormalise, as the
paper's code does (``src/models/vit_edited.py`` of github.com/martinagvilas/vit-cls_emb,
which zeroes the CLS column of every image-token row): the image rows then sum to less than
1 and the attention output shrinks by the weight the prefix had. The post-softmax edits need
the probabilities, so they turn timm's fused attention off for the pass and edit what
``attn_drop`` (the identity in eval mode) returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.projection import ClassProjection
from worker.lens.ranks import class_rank, identifiability
from worker.lens.regions import Region, central_box
from worker.lens.tokens import dropped_tokens
from worker.lens.vit import Trace, ViTSpec, attention_of, blocks_of, inspect_vit, trace, unfused_attention

AttentionPerturbation = Literal["self-only", "no-cls"]
NoClsConvention = Literal["pre_softmax", "zero_renormalised", "zero"]
NO_CLS_CONVENTIONS: dict[NoClsConvention, str] = {
    "pre_softmax": "image-token queries' attention to the prefix keys masked before the softmax",
    "zero_renormalised": "image-token queries' attention to the prefix keys zeroed after the softmax, "
    "each row renormalised to sum to 1 (equal to pre_softmax up to rounding)",
    "zero": "image-token queries' attention to the prefix keys zeroed after the softmax, not renormalised "
    "(the paper's code)",
}


def attention_mask(kind: AttentionPerturbation, num_prefix: int, num_image_tokens: int) -> torch.Tensor:
    """``[T, T]`` bool, ``True`` where query (row) may attend to key (column)."""
    tokens = num_prefix + num_image_tokens
    mask = torch.ones(tokens, tokens, dtype=torch.bool)
    if kind == "self-only":
        mask[num_prefix:] = False
        image = torch.arange(num_prefix, tokens)
        mask[image, image] = True
    elif kind == "no-cls":
        if not num_prefix:
            raise ValueError("no-cls needs prefix tokens; this model has none")
        mask[num_prefix:, :num_prefix] = False
    else:
        raise ValueError(f"unknown attention perturbation {kind!r}")
    return mask


@contextmanager
def masked_attention(model: VisionTransformer, mask: torch.Tensor) -> Iterator[None]:
    """Every block's attention called with ``attn_mask=mask``; the hooks are removed on leaving."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return args, {**kwargs, "attn_mask": mask.to(args[0].device)}

    handles = []
    try:
        for block in blocks_of(model):
            handles.append(attention_of(block).register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def prefix_zeroed_attention(model: VisionTransformer, num_prefix: int, renormalise: bool) -> Iterator[None]:
    """Every block's attention probabilities with the image-token rows' prefix columns set to 0 after the softmax.

    ``renormalise`` divides each edited row by its new sum. timm's fused attention never forms the
    probabilities, so it is off for the pass (and restored); the edit replaces ``attn_drop``'s output.
    """
    if not num_prefix:
        raise ValueError("no-cls needs prefix tokens; this model has none")

    def edit(module: nn.Module, inputs: Any, probabilities: torch.Tensor) -> torch.Tensor:
        edited = probabilities.clone()
        edited[:, :, num_prefix:, :num_prefix] = 0
        if renormalise:
            edited[:, :, num_prefix:] /= edited[:, :, num_prefix:].sum(dim=-1, keepdim=True)
        return edited

    with unfused_attention([attention_of(block) for block in blocks_of(model)], edit):
        yield


def no_cls_attention(
    model: VisionTransformer, spec: ViTSpec, convention: NoClsConvention
) -> AbstractContextManager[None]:
    """The ``no-cls`` perturbation of every block, in ``convention``."""
    if convention == "pre_softmax":
        return masked_attention(model, attention_mask("no-cls", spec.num_prefix, spec.num_image_tokens))
    if convention in ("zero_renormalised", "zero"):
        return prefix_zeroed_attention(model, spec.num_prefix, renormalise=convention == "zero_renormalised")
    raise ValueError(f"unknown no-cls convention {convention!r}")


def region_keep(grid: tuple[int, int], region: Region) -> torch.Tensor:
    """Row-major indices of the image tokens *outside* ``region`` (row0, col0, row1, col1; end-exclusive)."""
    h, w = grid
    row0, col0, row1, col1 = region
    if not (0 <= row0 < row1 <= h and 0 <= col0 < col1 <= w):
        raise ValueError(
            f"region {list(region)} is not a box on the {h}x{w} grid: need 0 <= row0 < row1 <= {h} "
            f"and 0 <= col0 < col1 <= {w} (end-exclusive)"
        )
    rows, columns = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = (rows >= row0) & (rows < row1) & (columns >= col0) & (columns < col1)
    keep = torch.nonzero(~inside.flatten()).flatten()
    if not len(keep):
        raise ValueError(f"region {list(region)} covers the whole {h}x{w} grid: no image token would be left")
    return keep


def default_region(grid: tuple[int, int]) -> Region:
    """The region dropped when none is given: the central region of the audits' ``central_share``.

    That is :func:`worker.lens.regions.central_box` (3x3 of a 7x7 grid). A grid with an axis of
    2 cells has no central cell on it: such a model needs an explicit ``region``.
    """
    region = central_box(grid)
    row0, col0, row1, col1 = region
    if row0 == row1 or col0 == col1:
        raise ValueError(f"the {grid[0]}x{grid[1]} grid has no central region: give the region to drop")
    return region


def _identifiability(
    projection: ClassProjection, spec: ViTSpec, residual: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``[B, L + 1, N']``: identifiability of ``targets`` at every image token of every layer."""
    logits = projection(residual[:, :, spec.num_prefix :])  # [B, L + 1, N', C]
    ranks = class_rank(logits, targets[:, None].to(logits.device))[:, 0]  # [B, L + 1, N']
    return identifiability(ranks, spec.num_classes).to(torch.float64).cpu()


def perturbation_effects(
    model: VisionTransformer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    region: Region | None = None,
    no_cls: NoClsConvention = "pre_softmax",
) -> dict[str, Any]:
    """Per-layer mean image-token identifiability, unperturbed and under each perturbation.

    ``batches`` yields ``(images, labels)`` (``labels`` ``None``: use the unperturbed prediction);
    ``no_cls`` says how the ``no-cls`` pass removes the prefix keys (see the module docstring).
    Returns ``[L + 1]`` float64 curves: ``original``, ``self-only``, ``no-cls`` (absent without
    prefix tokens), ``context`` and ``context_original`` (the unperturbed pass over the kept
    tokens), and the top-1 agreement of each pass's output with the targets (``hits``).
    """
    spec = inspect_vit(model)
    projection = ClassProjection(model)
    region = region or default_region(spec.grid)
    keep = region_keep(spec.grid, region)
    kinds: list[AttentionPerturbation] = ["self-only", "no-cls"] if spec.num_prefix else ["self-only"]
    self_only = attention_mask("self-only", spec.num_prefix, spec.num_image_tokens)
    perturbations: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "self-only": lambda: masked_attention(model, self_only),
        "no-cls": lambda: no_cls_attention(model, spec, no_cls),
    }
    sums = {
        name: torch.zeros(spec.depth + 1, dtype=torch.float64)
        for name in ["original", *kinds, "context", "context_original"]
    }
    hits = dict.fromkeys(["original", *kinds, "context"], 0)
    images = 0

    def traced(batch: torch.Tensor, context: AbstractContextManager[Any] | None = None) -> Trace:
        with torch.no_grad(), context or nullcontext():
            return trace(model, batch, sublayers=False)

    for batch, labels in batches:
        run = traced(batch)
        targets = (run.logits.argmax(dim=-1) if labels is None else labels).to(run.logits.device)
        original = _identifiability(projection, spec, run.residual, targets)
        sums["original"] += original.mean(dim=2).sum(dim=0)
        sums["context_original"] += original[:, :, keep].mean(dim=2).sum(dim=0)
        hits["original"] += _hits(run.logits, targets)
        perturbed: dict[str, Trace] = {kind: traced(batch, perturbations[kind]()) for kind in kinds}
        perturbed["context"] = traced(batch, dropped_tokens(model, keep))
        for name, result in perturbed.items():
            sums[name] += _identifiability(projection, spec, result.residual, targets).mean(dim=2).sum(dim=0)
            hits[name] += _hits(result.logits, targets)
        images += len(batch)
    if not images:
        raise ValueError("no images")
    return {
        "curves": {name: total / images for name, total in sums.items()},
        "hits": {name: count / images for name, count in hits.items()},
        "region": region,
        "kept_tokens": len(keep),
    }


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> int:
    return int((logits.argmax(dim=-1) == targets).sum())
