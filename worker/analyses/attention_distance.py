"""Mean attention distance per block and head (docs/methods.md; Raghu et al., NeurIPS 2021).

For block ``b`` and head ``h``: the mean over images and image-token queries ``q``
of ``sum_k A[q, k] d(q, k)``, where ``d`` is the Euclidean distance in pixels
between the centres of patches ``q`` and ``k`` (the patch size times the grid
distance). The reference convention drops the prefix-token rows and columns and
does not renormalise the remaining weights (``prefix="drop"``); ``prefix="renormalise"``
rescales each query's image-token weights to sum to one. Self-only attention
gives 0 either way.

Attention probabilities are materialised by switching timm's fused attention
off for the pass (:func:`worker.lens.vit.materialised_attention`); the model's
outputs do not change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.lens.vit import inspect_vit, materialised_attention

PrefixConvention = Literal["drop", "renormalise"]


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """``[N, N]`` Euclidean pixel distances between patch centres on an ``h x w`` grid (row-major)."""
    rows, columns = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten() * patch_size[0], columns.flatten() * patch_size[1]], dim=1)
    return torch.cdist(centres.to(torch.float64), centres.to(torch.float64))


def distance_from_attention(
    probabilities: torch.Tensor, distances: torch.Tensor, num_prefix: int, prefix: PrefixConvention = "drop"
) -> torch.Tensor:
    """Per head, the summed ``[B, H]`` attention distance of image-token queries (sum over images and queries).

    ``probabilities``: ``[B, H, T, T]`` of one block. Returns sums so that batches add up; divide by
    ``B * N`` for the mean.
    """
    image = probabilities[:, :, num_prefix:, num_prefix:].to(torch.float64)  # [B, H, N, N]
    if prefix == "renormalise":
        image = image / image.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    per_query = (image * distances).sum(dim=-1)  # [B, H, N]
    return per_query.sum(dim=(0, 2))  # [H]


class _BlockDistances:
    """Reduces each block's attention probabilities to per-head distance sums as they are produced."""

    def __init__(self, depth: int, heads: int, distances: torch.Tensor, num_prefix: int, prefix: PrefixConvention):
        self.totals = torch.zeros(depth, heads, dtype=torch.float64)
        self.depth, self.distances, self.num_prefix, self.prefix = depth, distances, num_prefix, prefix
        self.calls = 0

    def append(self, probabilities: torch.Tensor, /) -> None:
        block = self.calls % self.depth
        distances = self.distances.to(probabilities.device)
        self.totals[block] += distance_from_attention(probabilities, distances, self.num_prefix, self.prefix).cpu()
        self.calls += 1


def mean_attention_distance(
    model: VisionTransformer, batches: Iterable[torch.Tensor], prefix: PrefixConvention = "drop"
) -> torch.Tensor:
    """``[L, H]`` mean attention distance in pixels over all images of ``batches``.

    No attention map outlives its block: memory does not grow with the number of images.
    """
    spec = inspect_vit(model)
    sink = _BlockDistances(
        spec.depth, spec.num_heads, patch_distances(spec.grid, spec.patch_size), spec.num_prefix, prefix
    )
    images = 0
    with torch.no_grad(), materialised_attention(model, sink):
        for batch in batches:
            model(batch)
            images += len(batch)
    if not images:
        raise ValueError("no images")
    return sink.totals / (images * spec.num_image_tokens)
