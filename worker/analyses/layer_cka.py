"""CKA between every pair of layers, within one model or across two, and token-localisation CKA
(docs/methods.md, "Minibatch CKA", "Model comparison", "Token-localisation CKA").

Every layer's output is reduced to its U-centred Gram the moment the pass produces it
(:class:`worker.analyses.cka.MinibatchCKA`), so no activation outlives its batch and memory
grows with layers x n^2, never with the number of images. Across two models, each batch is
the same images in the same order, preprocessed as each model expects (rows are paired).
Every batch must hold at least 4 images (the unbiased HSIC needs them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.analyses.cka import CKAError, MinibatchCKA
from worker.analyses.representations import (
    Representation,
    check_representation,
    describe,
    reduce,
    run_layers,
)
from worker.lens.vit import blocks_of, hooked, inspect_vit

MIN_BATCH = 4


@dataclass(frozen=True)
class CKAMatrix:
    rows: list[str]
    columns: list[str]
    values: torch.Tensor  # [rows, columns] float64
    examples: int
    batches: int


def check_batch(size: int) -> None:
    if size < MIN_BATCH:
        raise CKAError(f"a batch of {size} image(s): minibatch CKA needs at least {MIN_BATCH} images per batch")


def cka_within(
    model: nn.Module, batches: Iterable[torch.Tensor], representation: Representation = "tokens"
) -> CKAMatrix:
    """Layer x layer minibatch CKA of one model over all images of ``batches``."""
    spec = describe(model)
    check_representation(spec, representation)
    names = list(spec.names)
    accumulator = MinibatchCKA(names, names)
    for batch in batches:
        check_batch(len(batch))
        run_layers(model, batch, lambda name, raw: accumulator.add(name, reduce(raw, representation, spec)), spec)
        accumulator.end_batch()
    return CKAMatrix(names, names, accumulator.result(), accumulator.examples, accumulator.batches)


def cka_across(
    model_a: nn.Module,
    model_b: nn.Module,
    paired_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    representation: Representation = "tokens",
) -> CKAMatrix:
    """CKA between every layer of ``model_a`` (rows) and every layer of ``model_b`` (columns).

    ``paired_batches`` yields the same images for both models (each preprocessed for its model).
    """
    spec_a, spec_b = describe(model_a), describe(model_b)
    check_representation(spec_a, representation)
    check_representation(spec_b, representation)
    rows = [f"a:{name}" for name in spec_a.names]
    columns = [f"b:{name}" for name in spec_b.names]
    accumulator = MinibatchCKA(rows, columns)
    for batch_a, batch_b in paired_batches:
        if len(batch_a) != len(batch_b):
            raise CKAError(f"paired batches of {len(batch_a)} and {len(batch_b)} images: rows must be the same images")
        check_batch(len(batch_a))
        run_layers(
            model_a, batch_a, lambda name, raw: accumulator.add(f"a:{name}", reduce(raw, representation, spec_a))
        )
        run_layers(
            model_b, batch_b, lambda name, raw: accumulator.add(f"b:{name}", reduce(raw, representation, spec_b))
        )
        accumulator.end_batch()
    return CKAMatrix(
        list(spec_a.names), list(spec_b.names), accumulator.result(), accumulator.examples, accumulator.batches
    )


def image_patches(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C * p * p]``: the pixels of every grid patch, row-major, as the patch embedding cuts them."""
    patches = F.unfold(images, kernel_size=patch_size, stride=patch_size)  # [B, C*p*p, N]
    return patches.transpose(1, 2)


@dataclass(frozen=True)
class LocalisationMaps:
    grid: tuple[int, int]
    maps: torch.Tensor  # [N, h, w]: for final-layer token j, CKA with the input patch at every position i
    examples: int
    batches: int

    def best_patches(self) -> torch.Tensor:
        """``[N]``: for every token, the input position with the highest CKA (NaN, a constant patch, never wins)."""
        return self.maps.flatten(1).nan_to_num(nan=-torch.inf).argmax(dim=1)

    def own_position_share(self) -> float:
        """Share of tokens whose most similar input patch is the one at their own position."""
        best = self.best_patches()
        return float((best == torch.arange(len(best))).double().mean())

    def mean_offset(self, patch_size: tuple[int, int]) -> float:
        """Mean pixel distance between each token's position and its most similar input patch."""
        w = self.grid[1]
        best = self.best_patches()
        own = torch.arange(len(best))
        rows = (best // w - own // w).double() * patch_size[0]
        columns = (best % w - own % w).double() * patch_size[1]
        return float(torch.sqrt(rows**2 + columns**2).mean())


def localisation_cka(model: VisionTransformer, batches: Iterable[torch.Tensor]) -> LocalisationMaps:
    """Token-localisation CKA: CKA between input patch ``i`` (pixels) and final-layer token ``j``, over all images.

    The final layer is the residual stream ``x_L`` before the final norm; the pixels are the
    model's input (after preprocessing). ``maps[j]`` is the ``h x w`` map over input positions
    ``i`` for token ``j`` (both row-major on the grid). A patch that is the same in every image
    of every batch (a blank border) has no variance: its CKA is NaN.
    """
    spec = inspect_vit(model)  # refuses CNNs and ViTs the lens cannot open up
    tokens = spec.num_image_tokens
    patch_names = [f"patch {i}" for i in range(tokens)]
    token_names = [f"token {j}" for j in range(tokens)]
    accumulator = MinibatchCKA(token_names, patch_names)

    def last_block(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        for j, name in enumerate(token_names):
            accumulator.add(name, output[:, spec.num_prefix + j])

    for batch in batches:
        check_batch(len(batch))
        for i, pixels in enumerate(image_patches(batch, spec.patch_size).unbind(dim=1)):
            accumulator.add(patch_names[i], pixels)
        with torch.no_grad(), hooked(blocks_of(model)[-1], last_block):
            model(batch)
        accumulator.end_batch()
    maps = accumulator.result().reshape(tokens, *spec.grid)
    return LocalisationMaps(spec.grid, maps, accumulator.examples, accumulator.batches)
