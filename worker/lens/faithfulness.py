"""Token-removal faithfulness of relevance maps (docs/methods.md, "Faithfulness (token removal)").

Image tokens are ordered by a relevance map and a growing share of them is
removed from the sequence after the position embedding
(:func:`worker.lens.tokens.forward_without_tokens`, "Context perturbation"):

- positive perturbation drops the top ``k%`` first: the faster accuracy and the
  target's probability fall, the better the map;
- negative perturbation drops the bottom ``k%`` first: the slower they fall, the better.

``k = 0, 10, ..., 90`` by default; the number of tokens dropped is ``round(k * N)``.
Each curve is summarised by :func:`auc`. The paper's ViT-B/32 figures on
ImageNet-S (positive / negative AUC of accuracy): class-embedding gradients
0.413 / 0.836, Chefer et al. 0.393 / 0.845, random order 0.716 / 0.716.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.lens.tokens import forward_without_tokens
from worker.lens.vit import inspect_vit

DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(10))  # 0.0, 0.1, ..., 0.9

RelevanceMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(images [B, 3, H, W], targets [B, K]) -> relevance [B, K, N]``."""


def tokens_to_keep(relevance: torch.Tensor, fraction: float, *, positive: bool) -> torch.Tensor:
    """Indices ``[B, N - round(fraction * N)]`` of the image tokens left after the removal step.

    ``positive`` drops the most relevant tokens, otherwise the least relevant.
    Ties are broken by token index (stable sort), so a constant map drops tokens
    in grid order in both directions. The kept indices are in relevance order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    count = relevance.shape[-1]
    dropped = round(fraction * count)
    order = torch.sort(relevance, dim=-1, descending=positive, stable=True).indices  # dropped first
    return order[:, dropped:]


def _removal_totals(
    model: VisionTransformer,
    images: torch.Tensor,
    targets: torch.Tensor,
    relevance: torch.Tensor,
    positive: bool,
    fractions: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fraction, the number of images still classified as their target and the sum of its probability."""
    targets = targets.to(images.device)
    relevance = relevance.to(images.device)
    correct = torch.zeros(len(fractions), dtype=torch.float64)
    probability = torch.zeros(len(fractions), dtype=torch.float64)
    with torch.no_grad():
        for i, fraction in enumerate(fractions):
            keep = tokens_to_keep(relevance, fraction, positive=positive)
            logits = forward_without_tokens(model, images, keep)
            correct[i] = (logits.argmax(dim=-1) == targets).sum().item()
            probability[i] = logits.softmax(dim=-1).gather(1, targets[:, None]).sum().item()
    return correct, probability


def _check_inputs(
    model: VisionTransformer, images: torch.Tensor, targets: torch.Tensor, fractions: Sequence[float]
) -> int:
    spec = inspect_vit(model)
    if targets.shape != (images.shape[0],):
        raise ValueError(f"labels must be [batch] class indices, got {list(targets.shape)}")
    if len(fractions) < 2 or any(b <= a for a, b in itertools.pairwise(fractions)):
        raise ValueError("fractions must be at least two increasing values")
    return spec.num_image_tokens


def removal_curve(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    relevance: torch.Tensor,
    *,
    positive: bool,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, Any]:
    """Accuracy and mean target probability as tokens are removed in relevance order.

    ``labels`` (``[B]``) are the true labels, which are also the target class:
    accuracy counts images whose top-1 class is still the label, and the
    probability is the label's softmax probability. ``relevance`` is ``[B, N]``. Returns ``fractions``, ``dropped``
    (tokens removed at each step), ``accuracy`` and ``probability`` as lists.
    """
    count = _check_inputs(model, images, labels, fractions)
    if relevance.shape != (images.shape[0], count):
        raise ValueError(f"relevance must be [batch, {count}], got {list(relevance.shape)}")
    correct, probability = _removal_totals(model, images, labels, relevance, positive, fractions)
    return _curve(fractions, count, correct / len(images), probability / len(images))


def _curve(fractions: Sequence[float], count: int, accuracy: torch.Tensor, probability: torch.Tensor) -> dict[str, Any]:
    return {
        "fractions": [float(f) for f in fractions],
        "dropped": [round(f * count) for f in fractions],
        "accuracy": accuracy.tolist(),
        "probability": probability.tolist(),
    }


def auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under ``values`` over ``fractions``, divided by the x range ``fractions[-1] - fractions[0]``.

    The normalisation makes the AUC the curve's mean height: a constant curve ``y``
    gives ``y`` whatever the fractions, so curves over ``0 .. 0.9`` stay on a 0..1
    scale comparable with accuracy. (Without it, ``0 .. 0.9`` would cap the area at 0.9.)
    """
    if len(fractions) != len(values) or len(fractions) < 2:
        raise ValueError("auc needs at least two points and one value per fraction")
    span = fractions[-1] - fractions[0]
    if span <= 0:
        raise ValueError("fractions must increase")
    area = sum(
        (x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(fractions, fractions[1:], values, values[1:], strict=False)
    )
    return float(area / span)


def evaluate_methods(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    methods: Mapping[str, RelevanceMethod],
    batch_size: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, dict[str, Any]]:
    """Positive and negative removal curves and their AUCs for every relevance method.

    Each method is called per batch as ``method(images, targets)`` with the true
    labels as targets (``[b, 1]``) and must return ``[b, 1, N]``; it is called
    with grad mode as the caller left it, so gradient methods must enable it
    themselves (all of :mod:`worker.lens` does). Every batch is scored the same
    way, so the result does not depend on ``batch_size``. Returns, per method::

        {"positive": {"fractions", "dropped", "accuracy", "probability",
                      "auc": {"accuracy": float, "probability": float}},
         "negative": {...}}
    """
    count = _check_inputs(model, images, labels, fractions)
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    directions = {"positive": True, "negative": False}
    zeros = torch.zeros(len(fractions), dtype=torch.float64)
    correct = {(name, key): zeros.clone() for name in methods for key in directions}
    probability = {(name, key): zeros.clone() for name in methods for key in directions}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        targets = labels[start : start + batch_size].to(batch.device)
        for name, method in methods.items():
            relevance = method(batch, targets[:, None])
            if relevance.shape != (len(batch), 1, count):
                raise ValueError(
                    f"method {name!r} returned {list(relevance.shape)}, expected [{len(batch)}, 1, {count}]"
                )
            for key, positive in directions.items():
                batch_correct, batch_probability = _removal_totals(
                    model, batch, targets, relevance[:, 0].detach(), positive, fractions
                )
                correct[name, key] += batch_correct
                probability[name, key] += batch_probability

    results: dict[str, dict[str, Any]] = {}
    for name in methods:
        results[name] = {}
        for key in directions:
            curve = _curve(fractions, count, correct[name, key] / len(images), probability[name, key] / len(images))
            curve["auc"] = {
                "accuracy": auc(fractions, curve["accuracy"]),
                "probability": auc(fractions, curve["probability"]),
            }
            results[name][key] = curve
    return results
