"""Run a ViT on a subset of its image tokens (docs/methods.md, "Context perturbation").

"Context perturbation" drops a set of image tokens from the sequence after the
position embedding, so that every remaining token keeps its own position code
and the model simply never sees the others. The token-removal faithfulness
protocol ("Faithfulness (token removal)") uses the same operation with the
tokens ordered by a relevance map, and the ``perturb`` analysis
(:mod:`worker.analyses.perturbation`) with the tokens of a grid region.

Dropping tokens (rather than blanking pixels) avoids feeding the model
out-of-distribution patches: what is measured is the loss of information, not
the model's reaction to grey squares.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.vit import hooked, inspect_vit


def keep_tokens(sequence: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``[B, P + n_keep, D]``: the prefix tokens of ``sequence`` ``[B, P + N, D]`` and its image tokens ``keep``.

    ``keep`` holds indices ``0 .. N-1`` of image tokens, row-major on the grid: ``[n_keep]``
    for the same tokens in every image, or ``[B, n_keep]`` for each image its own.
    """
    index = keep.to(sequence.device)
    if index.ndim == 1:
        index = index.expand(sequence.shape[0], -1)
    image = sequence[:, num_prefix:].gather(1, index[:, :, None].expand(-1, -1, sequence.shape[-1]))
    return torch.cat([sequence[:, :num_prefix], image], dim=1)


@contextmanager
def dropped_tokens(model: VisionTransformer, keep: torch.Tensor) -> Iterator[None]:
    """Inside the block, only the prefix tokens and the image tokens ``keep`` enter ``model``'s blocks.

    A forward hook on ``patch_drop``, which timm's ``forward_features`` runs right after
    ``_pos_embed``: every later step (``norm_pre``, the blocks, ``norm``, the head's pooling
    by ``num_prefix_tokens``) sees the shorter sequence, whoever runs the model (its own
    forward, or :func:`worker.lens.vit.trace`). ``keep`` as in :func:`keep_tokens`. Put the
    model in eval mode: in training mode ``patch_drop`` would remove more than asked.
    """
    prefix = int(model.num_prefix_tokens)

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return keep_tokens(output, keep, prefix)

    with hooked(model.patch_drop, hook):
        yield


def forward_without_tokens(model: VisionTransformer, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, C]`` when only the image tokens listed in ``keep`` stay in the sequence.

    ``keep`` is ``[B, n_keep]`` (int64): indices ``0 .. N-1`` of image tokens, row-major
    on the ``h x w`` grid, the same count for every image. Prefix tokens (CLS,
    distillation, registers) always stay. The model's own forward pass runs under
    :func:`dropped_tokens`, and its head pools by ``num_prefix_tokens``: the CLS token,
    or the mean of whatever image tokens are left. Keeping every token therefore
    reproduces ``model(images)``.
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
    with dropped_tokens(model, keep):
        logits: torch.Tensor = model(images)
    return logits
