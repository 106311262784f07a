"""Relevance baselines to compare the class-embedding maps against (docs/methods.md, "Faithfulness").

Every function returns ``[B, K, N]``, the convention of
:func:`worker.lens.gradient.gradient_relevance`: ``targets`` is ``[B, K]`` class
indices and ``N`` the number of image tokens (row-major on the ``h x w`` grid).
Higher means more relevant. The faithfulness protocol only uses the order of
the values, so their scale does not matter.

- :func:`random_relevance`: a seeded random order, the floor every method must beat
  (the paper's "random order": 0.716 / 0.716 positive / negative AUC on ViT-B/32, under its own protocol).
- :func:`attention_rollout`: Abnar & Zuidema, "Quantifying Attention Flow in
  Transformers" (ACL 2020). Class-agnostic.
- :func:`grad_cam`: Selvaraju et al., "Grad-CAM" (ICCV 2017), applied to a ViT the
  way it is commonly done for transformers: the activations are the last block's
  ``norm1`` output at the image tokens, treated as a 1 x N "feature map".
- :func:`chefer_relevance`: Chefer, Gur & Wolf, "Transformer Interpretability Beyond
  Attention Visualization" (CVPR 2021), the gradient-weighted attention relevance the
  paper compares its gradient map with (docs/methods.md, "Chefer et al. 2021").

Rollout and Chefer's relevance open any family the lens opens
(:func:`worker.lens.families.open_model`); Grad-CAM needs a timm ``VisionTransformer``.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from worker.lens.adapter import LensModel, ViTSpec
from worker.lens.families import open_model
from worker.lens.vit import UnsupportedModelError, hooked, inspect_vit, save_as_leaf


def random_relevance(
    images: torch.Tensor, targets: torch.Tensor, num_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform random relevance ``[B, K, N]``: a random token order, reproducible through ``generator``.

    The values are drawn on the generator's device and moved to the images' device,
    so the same seed gives the same order whatever device the model runs on.
    """
    batch, k = targets.shape
    values = torch.rand(batch, k, num_tokens, generator=generator, device=generator.device)
    return values.to(images.device)


def attention_rollout(model: nn.Module | LensModel, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020): ``[B, K, N]``, the same map for every target.

    Per block, ``A_b`` averaged over heads plus the identity (the residual
    connection), rows renormalised to sum to 1; the rollout is the product
    ``A_L ... A_1``. For a CLS-pooled model the map is the CLS row (row 0) at the
    image-token columns; for a GAP model, which reads out the mean of its image
    tokens, it is the mean of the image-token rows. Rollout ignores the class, so
    the map is repeated over the ``K`` targets.
    """
    lens = open_model(model)
    with torch.no_grad():
        run = lens.trace(images, sublayers=False, attention_probs=True)
        assert run.attention_probs is not None
        tokens = run.attention_probs[0].shape[-1]
        identity = torch.eye(tokens, dtype=run.attention_probs[0].dtype, device=images.device)
        rollout = identity.expand(images.shape[0], -1, -1)
        for probs in run.attention_probs:
            mixed = probs.mean(dim=1) + identity  # [B, T, T]
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed @ rollout
        flow = _read_out_rows(rollout, lens.spec)
    return flow[:, None, :].expand(-1, targets.shape[1], -1).clone()


def _read_out_rows(relevance: torch.Tensor, spec: ViTSpec) -> torch.Tensor:
    """``[B, T, T] -> [B, N]``: the CLS row at the image-token columns, or the mean of the image-token rows.

    A CLS-pooled model reads its decision from the CLS token; a GAP model reads the mean of
    its image tokens, so the flow into its decision is the mean of their rows.
    """
    if spec.pooling == "token":
        return relevance[:, 0, spec.num_prefix :]
    return relevance[:, spec.num_prefix :, spec.num_prefix :].mean(dim=1)


def chefer_relevance(model: nn.Module | LensModel, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Chefer et al. (CVPR 2021) gradient-weighted attention relevance: ``[B, K, N]``, non-negative.

    ``R = I`` (``T x T``); for each block ``b`` in order, ``Abar_b = mean_h (dy_c/dA_b * A_b)^+``
    and ``R <- R + Abar_b R``, with ``y_c`` the target's logit and ``A_b`` the attention
    probabilities. The relevance of image token ``j`` is ``R[CLS, j]``; a model without a
    CLS token reads the mean of the image tokens' rows (:func:`_read_out_rows`).

    ``dy_c/dA_b`` is the full derivative, through every later block (``A_b`` is recorded as
    an intermediate of the graph, not cut into a leaf). One forward pass, and per target one
    backward pass that yields every block's gradient at once. The images are made to require
    grad so that the graph exists even when no parameter requires grad; parameters'
    ``.grad`` are left untouched.
    """
    lens = open_model(model)
    probs: list[torch.Tensor] = []
    with torch.enable_grad(), lens.attention_probabilities(probs):
        logits = lens.logits(images.detach().requires_grad_(True))
    if len(probs) != lens.spec.depth:
        raise RuntimeError(f"expected {lens.spec.depth} attention maps, saw {len(probs)}")
    identity = torch.eye(probs[0].shape[-1], dtype=probs[0].dtype, device=probs[0].device)
    maps = []
    count = targets.shape[1]
    for k in range(count):
        score = logits.gather(1, targets[:, k : k + 1].to(logits.device)).sum()
        grads = torch.autograd.grad(score, probs, retain_graph=k < count - 1)
        relevance = identity.expand(images.shape[0], -1, -1)
        for attention, grad in zip(probs, grads, strict=True):
            weighted = (grad * attention.detach()).clamp(min=0).mean(dim=1)  # [B, T, T]
            relevance = relevance + weighted @ relevance
        maps.append(_read_out_rows(relevance, lens.spec))
    return torch.stack(maps, dim=1)


def grad_cam(model: VisionTransformer, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) on the last block of a ViT: ``[B, K, N]``, non-negative.

    Activations ``A`` are the output of ``model.blocks[-1].norm1`` at the image
    tokens (``[B, N, D]``, the usual ViT target layer, our own implementation).
    For each target, ``w_d`` is the mean over image tokens of ``d logit / d A[:, :, d]``
    and the map is ``relu(sum_d w_d A[:, :, d])``. One forward pass, one backward
    pass per target. The hook is removed whatever happens; parameters'
    ``requires_grad`` and ``.grad`` are left untouched.
    """
    spec = inspect_vit(model)
    last = model.blocks[-1]
    if spec.post_norm or not isinstance(last, Block):
        # A post-norm block's norm1 normalises the attention output, not the block's input:
        # there is no pre-attention activation of the last block to weight.
        raise UnsupportedModelError(f"Grad-CAM reads a pre-norm block's norm1; {type(last).__name__} is post-norm")
    store: list[torch.Tensor] = []
    with torch.enable_grad(), hooked(last.norm1, save_as_leaf(store)):
        logits = model(images)
    if len(store) != 1:
        raise RuntimeError(f"expected one pass through the last block's norm1, saw {len(store)}")
    activations = store[0]  # [B, T, D]
    image_activations = activations[:, spec.num_prefix :].detach()
    maps = []
    count = targets.shape[1]
    for k in range(count):
        score = logits.gather(1, targets[:, k : k + 1].to(logits.device)).sum()
        (grads,) = torch.autograd.grad(score, activations, retain_graph=k < count - 1)
        weights = grads[:, spec.num_prefix :].mean(dim=1)  # [B, D]
        maps.append(torch.relu((image_activations * weights[:, None, :]).sum(dim=-1)))
    return torch.stack(maps, dim=1)
