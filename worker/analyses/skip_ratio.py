"""Skip-connection ratio per block and sublayer (METHODS.md section 2; Raghu et al., NeurIPS 2021).

``||z|| / ||f(z)||`` with ``z`` the residual input of the branch and ``f(z)`` its
output: for attention ``z = x_{b-1}``, ``f(z) = a_b``; for the MLP
``z = x' = x_{b-1} + a_b``, ``f(z) = m_b``. Reported for the CLS (first prefix)
token and for image tokens, aggregated as the mean of per-token ratios over
images (and, for image tokens, over tokens). A large ratio means the block
mostly passes its input through.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.lens.vit import inspect_vit, trace


def skip_ratios(model: VisionTransformer, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"attention_cls", "attention_image", "mlp_cls", "mlp_image"}``: ``[L]`` mean ratios (float64).

    The ``*_cls`` entries are NaN for models without prefix tokens.
    """
    spec = inspect_vit(model)
    sums = {
        key: torch.zeros(spec.depth, dtype=torch.float64)
        for key in ("attention_cls", "attention_image", "mlp_cls", "mlp_image")
    }
    images = 0
    with torch.no_grad():
        for batch in batches:
            run = trace(model, batch, sublayers=True)
            assert run.attention is not None and run.mlp is not None
            inputs = run.residual[:, :-1]
            middle = inputs + run.attention  # x'
            for name, residual, branch in (("attention", inputs, run.attention), ("mlp", middle, run.mlp)):
                ratio = (
                    (residual.norm(dim=-1) / branch.norm(dim=-1).clamp_min(1e-12)).to(torch.float64).cpu()
                )  # [B, L, T]
                sums[f"{name}_image"] += ratio[:, :, spec.num_prefix :].mean(dim=2).sum(dim=0)
                if spec.num_prefix:
                    sums[f"{name}_cls"] += ratio[:, :, 0].sum(dim=0)
            images += len(batch)
    if not images:
        raise ValueError("no images")
    means = {key: value / images for key, value in sums.items()}
    if not spec.num_prefix:
        for key in ("attention_cls", "mlp_cls"):
            means[key] = torch.full_like(means[key], float("nan"))
    return means
