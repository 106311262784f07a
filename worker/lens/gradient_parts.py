"""The gradient relevance map taken apart by block and head (docs/methods.md, "Gradient relevance map"
and "Gradient relevance map by block and head").

The map of :func:`worker.lens.gradient.gradient_relevance` is the sum over blocks ``b`` and
heads ``h`` of ``-d l_b / d A_b[h, CLS, j]``, with ``l_b = cross_entropy(z(a_b[CLS]), c)``.
Each term of that sum is one part: block ``b``'s and head ``h``'s say on image token ``j``.
The parts come from the same single backward pass (each block's input is detached, so
``d(sum_b l_b) / dA_b = d l_b / dA_b``), and are kept apart instead of summed, so that summing
them over blocks and heads gives back the gradient map.

GAP models have no CLS row: as for the map, the gradient is summed over the image-token query
rows, and ``a_b`` is read out as the model reads its last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.lens.projection import ClassProjection


def gradient_parts(images: torch.Tensor, targets: torch.Tensor, projection: ClassProjection) -> torch.Tensor:
    """``[B, L, H, N]``: block ``b``'s, head ``h``'s term of the gradient map of ``targets`` (``[B]``) at token ``j``.

    The model is the one ``projection`` was built on. Summed over ``L`` and ``H`` it is
    ``gradient_relevance(images, targets[:, None], projection)[:, 0]``.
    """
    spec = projection.spec
    if targets.shape != (images.shape[0],):
        raise ValueError(f"targets must be [batch] class indices, got {list(targets.shape)}")
    with torch.enable_grad():
        run = projection.lens.trace(images, sublayers=True, for_attention_gradients=True)
        assert run.attention is not None
        assert run.attention_probs is not None
        main = projection.readouts[0]
        queries = slice(main.token, main.token + 1) if main.pooling == "token" else slice(spec.num_prefix, None)
        logits = projection.read_out(main, run.attention, run.residual[:, -1:])  # z(a_b), [B, L, C]
        log_probs = F.log_softmax(logits, dim=-1)
        index = targets.to(log_probs.device)[:, None, None].expand(-1, spec.depth, 1)
        loss = -log_probs.gather(-1, index).sum()
        grads = torch.autograd.grad(loss, run.attention_probs)
    # Each A_b is [B, H, T, T]: the query rows read out, the image-token columns, per head.
    parts = [-g[:, :, queries, spec.num_prefix :].sum(dim=2) for g in grads]
    return torch.stack(parts, dim=1).detach()
