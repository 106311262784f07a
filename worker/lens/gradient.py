"""Gradient relevance map (METHODS.md section 1, "Gradient relevance map"; Vilas et al., NeurIPS 2023).

For every block ``b``: ``l_b = cross_entropy(z(a_b[CLS]), c)``, with one
log-softmax (the reference code applies softmax twice; we do not). The
relevance of image token ``j`` is ``-sum_b sum_h d l_b / d A_b[h, CLS, j]``.

One forward pass records every ``A_b`` as a leaf and detaches each block's
input, so the sum of all blocks' losses can be differentiated in a single
backward pass per target: ``d(sum_b l_b)/dA_b = d l_b / dA_b`` because no later
loss sees ``A_b``.

GAP models have no CLS token: there ``a_b`` is read out at the mean of its
image tokens and the gradient is summed over the image-token query rows
(an extension of the paper's CLS-row definition, stated in the result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from worker.lens.projection import ClassProjection
from worker.lens.vit import trace


def gradient_relevance(
    model: VisionTransformer, images: torch.Tensor, targets: torch.Tensor, projection: ClassProjection
) -> torch.Tensor:
    """Relevance of each image token for each target: ``[B, K, N]`` (``targets`` is ``[B, K]``)."""
    spec = projection.spec
    with torch.enable_grad():
        run = trace(model, images, sublayers=True, for_attention_gradients=True)
        assert run.attention is not None and run.attention_probs is not None
        if spec.pooling == "token":
            queries = slice(0, 1)
            pooled = run.attention[:, :, 0]  # [B, L, D]: a_b at the CLS token
            reference = run.residual[:, -1:, 0]
        else:
            queries = slice(spec.num_prefix, None)
            pooled = run.attention[:, :, spec.num_prefix :].mean(dim=2)
            reference = run.residual[:, -1:, spec.num_prefix :].mean(dim=2)
        log_probs = F.log_softmax(projection(pooled, reference), dim=-1)  # [B, L, C]
        maps = []
        for k in range(targets.shape[1]):
            index = targets[:, k, None, None].expand(-1, spec.depth, 1)
            loss = -log_probs.gather(-1, index).sum()
            grads = torch.autograd.grad(loss, run.attention_probs, retain_graph=k < targets.shape[1] - 1)
            relevance = sum(g[:, :, queries, spec.num_prefix :].sum(dim=(1, 2)) for g in grads)
            maps.append(-relevance)
    return torch.stack(maps, dim=1).detach()  # type: ignore[arg-type]
