"""Is a trained ViT's class information more than its architecture gives at random? (docs/methods.md,
"Trained against random weights: paired tests").

Two per-image, per-layer measures, for the trained model and for a random-initialised model of
the same architecture, on the same images and for the same target class of each image:

- :func:`image_identifiability`: the mean identifiability ``1 - rank / C`` of the target at the
  image tokens of ``x_b``, for ``b = 0 .. L`` (fresh final-norm statistics, head bias);
- :func:`image_agreement`: the key-value agreement of block ``b`` (``b = 1 .. L``) over the
  image's own tokens (:func:`worker.analyses.memories.key_value_agreement`, called per image).

:func:`paired_tests` then runs, per layer, the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``)
on the pairs ``(trained_i, random_i)``, one pair per image: one-sided, trained greater than
random (the reference code's alternative for its memory statistics), differences of zero dropped
(``zero_method="wilcox"``). scipy's ``method="auto"`` picks the p-value: the exact null
distribution for up to 50 pairs without ties or zeros; with ties or zeros, all ``2^n`` sign
flips for up to 13 pairs; otherwise the normal approximation with continuity correction.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
from timm.models.vision_transformer import VisionTransformer

from worker.analyses.memories import key_value_agreement
from worker.lens.projection import ClassProjection
from worker.lens.ranks import class_rank
from worker.lens.vit import inspect_vit, trace

Alternative = Literal["greater", "two-sided", "less"]
TEST = "Wilcoxon signed-rank (scipy.stats.wilcoxon, zero_method='wilcox', method='auto')"


def image_identifiability(model: VisionTransformer, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, L + 1]``: per image and layer, the mean identifiability of ``targets`` (``[B]``) over image tokens."""
    spec = inspect_vit(model)
    projection = ClassProjection(model)
    with torch.no_grad():
        residual = trace(model, images, sublayers=False).residual[:, :, spec.num_prefix :]  # [B, L + 1, N, D]
        ranks = class_rank(projection(residual), targets.to(residual.device)[:, None])  # [B, 1, L + 1, N]
    # In float64: equal values are ties of the signed-rank test, so they should not be equal by float32 rounding.
    return (1.0 - ranks[:, 0].double() / spec.num_classes).mean(dim=-1).cpu()


def image_agreement(
    model: VisionTransformer, scores: torch.Tensor, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``[B, L]``: per image and block, the key-value agreement over that image's tokens.

    ``scores`` are the model's memory scores (:func:`worker.analyses.memories.memory_scores`).
    """
    return torch.stack(
        [key_value_agreement(model, scores, [(images[i : i + 1], targets[i : i + 1])]) for i in range(len(images))]
    )


def paired_tests(trained: np.ndarray, random: np.ndarray, alternative: Alternative = "greater") -> list[dict[str, Any]]:
    """Per layer (column), the Wilcoxon signed-rank test of ``trained`` against ``random``, ``[n, layers]`` each.

    Row ``i`` of both is image ``i``: the pairs.

    Each entry: ``statistic`` (the sum of the ranks of the positive differences), ``p_value``,
    ``n`` (pairs) and ``nonzero`` (pairs whose difference is not zero, the ones ranked). With no
    nonzero difference there is nothing to rank: ``statistic`` 0 and ``p_value`` 1.
    """
    if trained.shape != random.shape or trained.ndim != 2:
        raise ValueError(f"paired [n, layers] values expected, got {trained.shape} and {random.shape}")
    results = []
    for layer in range(trained.shape[1]):
        differences = trained[:, layer] - random[:, layer]
        nonzero = int(np.count_nonzero(differences))
        if nonzero == 0:
            statistic, p_value = 0.0, 1.0
        else:
            result = stats.wilcoxon(trained[:, layer], random[:, layer], alternative=alternative, zero_method="wilcox")
            statistic, p_value = float(result.statistic), float(result.pvalue)
        results.append({"statistic": statistic, "p_value": p_value, "n": len(differences), "nonzero": nonzero})
    return results
