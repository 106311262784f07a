"""Gradient relevance map (docs/methods.md, "Gradient relevance map"; Vilas et al., NeurIPS 2023).

For every block ``b``: ``l_b = cross_entropy(z(a_b[CLS]), c)``, with one
log-softmax (the reference code applies softmax twice; we do not). The
relevance of image token ``j`` is ``-sum_b sum_h d l_b / d A_b[h, CLS, j]``.

One forward pass records every ``A_b`` as a leaf and detaches each block's
input, so the sum of all blocks' losses can be differentiated in a single
backward pass per target: ``d(sum_b l_b)/dA_b = d l_b / dA_b`` because no later
loss sees ``A_b``.

GAP models have no CLS token: there ``a_b`` is read out as the model reads its
last layer (the mean of its image tokens, with the final norm before or after the
mean where the model has it) and the gradient is summed over the image-token query
rows (an extension of the paper's CLS-row definition, stated in the result). Only the
main head's read-out is used (for DeiT's distilled models, the CLS head), as the paper
defines ``z(a_b[CLS])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.lens.projection import ClassProjection


def _block_losses(
    images: torch.Tensor, projection: ClassProjection
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, slice]:
    """One traced pass: every block's ``A_b`` (leaves), ``log_softmax(z(a_b))`` ``[B, L, C]``, the query rows read.

    The graph is built under ``enable_grad``, so the caller can differentiate ``log_probs``
    with respect to the ``A_b`` whatever its own grad mode.
    """
    spec = projection.spec
    with torch.enable_grad():
        run = projection.lens.trace(images, sublayers=True, for_attention_gradients=True)
        assert run.attention is not None
        assert run.attention_probs is not None
        main = projection.readouts[0]
        queries = slice(main.token, main.token + 1) if main.pooling == "token" else slice(spec.num_prefix, None)
        # z(a_b) read out like the last layer, [B, L, C]; the cached scale from x_L.
        logits = projection.read_out(main, run.attention, run.residual[:, -1:])
        log_probs = F.log_softmax(logits, dim=-1)
    return tuple(run.attention_probs), log_probs, queries


def gradient_relevance(images: torch.Tensor, targets: torch.Tensor, projection: ClassProjection) -> torch.Tensor:
    """Relevance of each image token for each target: ``[B, K, N]`` (``targets`` is ``[B, K]``).

    The model is the one ``projection`` was built on.
    """
    spec = projection.spec
    probs, log_probs, queries = _block_losses(images, projection)
    maps = []
    for k in range(targets.shape[1]):
        index = targets[:, k, None, None].expand(-1, spec.depth, 1)
        loss = -log_probs.gather(-1, index).sum()
        grads = torch.autograd.grad(loss, probs, retain_graph=k < targets.shape[1] - 1)
        relevance = sum(g[:, :, queries, spec.num_prefix :].sum(dim=(1, 2)) for g in grads)
        maps.append(-relevance)
    return torch.stack(maps, dim=1).detach()  # type: ignore[arg-type]


def gradient_parts(images: torch.Tensor, targets: torch.Tensor, projection: ClassProjection) -> torch.Tensor:
    """``[B, L, H, N]``: block ``b``'s, head ``h``'s term of the gradient map of ``targets`` (``[B]``) at token ``j``.

    The map is the sum over blocks and heads of ``-d l_b / d A_b[h, CLS, j]``; these are its
    terms, from the same single backward pass, kept apart instead of summed (docs/methods.md,
    "Gradient relevance map by block and head"). Summed over ``L`` and ``H`` they are
    ``gradient_relevance(images, targets[:, None], projection)[:, 0]``.
    """
    spec = projection.spec
    if targets.shape != (images.shape[0],):
        raise ValueError(f"targets must be [batch] class indices, got {list(targets.shape)}")
    probs, log_probs, queries = _block_losses(images, projection)
    index = targets.to(log_probs.device)[:, None, None].expand(-1, spec.depth, 1)
    grads = torch.autograd.grad(-log_probs.gather(-1, index).sum(), probs)
    # Each A_b is [B, H, T, T]: the query rows read out, the image-token columns, per head.
    parts = [-g[:, :, queries, spec.num_prefix :].sum(dim=2) for g in grads]
    return torch.stack(parts, dim=1).detach()
