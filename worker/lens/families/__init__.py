"""Model families the lens can open up: one small adapter per family.

Placeholder while the adapters are written: every supported model is a timm
``VisionTransformer`` read by :func:`worker.lens.vit.inspect_vit`.
"""

from __future__ import annotations

from torch import nn

from model_store.manifest import Structure
from worker.lens.vit import inspect_vit


def describe(model: nn.Module) -> Structure:
    """The manifest's :class:`Structure` of ``model``; :class:`UnsupportedModelError` if the lens cannot open it."""
    spec = inspect_vit(model)
    return Structure(
        family="timm-vit",
        layers=spec.depth,
        grid=spec.grid,
        patch_size=spec.patch_size,
        prefix_tokens=spec.prefix_tokens,
        pooling=spec.pooling,
        width=spec.width,
        heads=spec.num_heads,
    )
