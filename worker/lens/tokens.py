"""Run a ViT on a subset of its image tokens (METHODS.md section 1, "Context perturbation").

"Context perturbation" drops a set of image tokens from the sequence after the
position embedding, so that every remaining token keeps its own position code
and the model simply never sees the others. The token-removal faithfulness
protocol ("Faithfulness (token removal)") uses the same operation with the
tokens ordered by a relevance map.

Dropping tokens (rather than blanking pixels) avoids feeding the model
out-of-distribution patches: what is measured is the loss of information, not
the model's reaction to grey squares.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.lens.vit import inspect_vit


def forward_without_tokens(model: VisionTransformer, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, C]`` when only the image tokens listed in ``keep`` stay in the sequence.

    ``keep`` is ``[B, n_keep]`` (int64): indices ``0 .. N-1`` of image tokens, row-major
    on the ``h x w`` grid, the same count for every image. Prefix tokens (CLS,
    distillation, registers) always stay. The pass follows timm's own
    ``forward_features`` step by step (``patch_embed``, ``_pos_embed``, then the
    gather, ``patch_drop``, ``norm_pre``, the blocks, ``norm``) and ends with the
    model's ``forward_head``, which pools by ``num_prefix_tokens``: the CLS token, or
    the mean of whatever image tokens are left. Keeping every token therefore
    reproduces ``model(images)``. Put the model in eval mode: in training mode
    ``patch_drop`` and dropout would remove more than asked.
    """
    spec = inspect_vit(model)
    if keep.ndim != 2 or keep.shape[0] != images.shape[0]:
        raise ValueError(f"keep must be [batch, n_keep] with batch {images.shape[0]}, got {list(keep.shape)}")
    if keep.dtype != torch.int64:
        raise ValueError(f"keep must hold int64 token indices, got {keep.dtype}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= spec.num_image_tokens):
        raise ValueError(f"keep holds indices outside 0..{spec.num_image_tokens - 1}")
    if keep.shape[1] == 0 and spec.pooling == "avg":
        raise ValueError("a GAP model needs at least one image token to pool")

    prefix = model.num_prefix_tokens
    x = model._pos_embed(model.patch_embed(images))  # [B, P + N, D]
    index = keep.to(x.device)[:, :, None].expand(-1, -1, x.shape[-1])
    x = torch.cat([x[:, :prefix], x[:, prefix:].gather(1, index)], dim=1)  # [B, P + n_keep, D]
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    logits: torch.Tensor = model.forward_head(x)
    return logits
