"""The floor of an explanation: the forward pass plus the lens's unavoidable arithmetic, and nothing else.

A full explanation projects ``2L + 1`` streams of every token onto the classes: the embedding's
``x_0`` and each block's attention and MLP outputs, ``E_c v`` for a ``D``-wide ``v`` against ``C``
classes (the residual stream's products are running sums of these; docs/methods.md, "Class-embedding
projection"). No implementation can skip those products, so ``(forward + products) / forward`` is the
ratio an explanation could reach if every other step (hooks, scales, ranks, maps, results) were free.
It is timed as one method in the same rounds as the others, so the comparison sees the same machine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer


def forward_and_products(model: VisionTransformer, images: torch.Tensor) -> Callable[[], object]:
    """A call that runs the plain forward pass, then the ``2L + 1`` stream-by-class products as one matmul.

    The streams are random vectors of the real shape (batch x tokens x width): the cost of a
    product does not depend on its values. One matmul is the cheapest way to do them all.
    """
    with torch.no_grad():
        tokens = model.forward_features(images)
    batch, count, width = tokens.shape
    streams = torch.randn(
        (2 * len(model.blocks) + 1) * batch * count,
        width,
        generator=torch.Generator().manual_seed(0),
        dtype=tokens.dtype,
    ).to(tokens.device)
    embedding = model.get_classifier().weight.detach()
    # Written into memory kept from call to call, as an explanation writes its logits (a fresh output
    # each call would fault tens of megabytes in anew and time the kernel's page zeroing, not the product).
    products = streams.new_empty(streams.shape[0], embedding.shape[0])

    def run() -> object:
        with torch.no_grad():
            logits = model(images)
            return logits, torch.mm(streams, embedding.T, out=products)

    return run
