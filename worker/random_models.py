"""Random-initialised timm ViTs, for the benchmarks and the tests.

What an explanation or an analysis costs depends on the architecture, not on what the
weights have learnt, and a test of the lens's identities holds for any weights: so both
build their models here, offline, without downloading pretrained weights. timm draws its
initial weights from torch's global generator, which is seeded first: one seed, one model.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer


def random_vit(architecture: str, *, seed: int = 0, **model_args: Any) -> VisionTransformer:
    """timm's ``architecture`` with ``model_args`` (``img_size``, ``depth``, ``num_classes``...), seeded, in eval mode.

    :class:`ValueError` when the architecture builds something other than a timm
    ``VisionTransformer`` (a distilled DeiT is one).
    """
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **model_args).eval()
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{architecture} is not a timm VisionTransformer")
    return model
