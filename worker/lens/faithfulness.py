"""Token-removal faithfulness of relevance maps (docs/methods.md, "Faithfulness (token removal)").

Image tokens are ordered by a relevance map and some of them are removed from the
sequence after the position embedding (:func:`worker.lens.tokens.forward_without_tokens`,
"Context perturbation"). Two protocols, always named with their figures:

- the project's (:data:`PROJECT`): remove ``k = 0, 10, ..., 90 %`` of the tokens
  (``round(k * N)``), positive perturbation the most relevant first (the faster accuracy
  and the target's probability fall, the better), negative the least relevant first (the
  slower, the better); each curve is summarised by :func:`auc`, the trapezoid area over
  the range of ``k``;
- the paper's (:data:`PAPER`, Vilas et al.'s reference code): for ``n = 1..N`` keep only
  the ``n`` least relevant tokens (positive perturbation) or the ``n`` most relevant
  (negative); each curve is summarised by :func:`paper_auc`, ``sum_n curve(n) / (max(curve) * N)``.

The paper's ViT-B/32 figures on ImageNet-S (positive / negative AUC of accuracy, its own
protocol): class-embedding gradients 0.413 / 0.836, Chefer et al. 0.393 / 0.845, random
order 0.716 / 0.716. They compare only with figures of the paper's protocol.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    keeps = [tokens_to_keep(relevance, fraction, positive=positive) for fraction in fractions]
    return _kept_totals(model, images, targets, keeps)


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


def paper_auc(values: Sequence[float]) -> float:
    """The paper's score of a curve over ``n = 1..N`` kept tokens: ``sum_n curve(n) / (max(curve) * N)``.

    Dividing by the curve's own maximum makes the score the curve's mean height relative to
    its peak (1 for a flat curve), so it compares orderings, not the model's accuracy. A
    curve that is 0 everywhere scores 0.
    """
    if len(values) < 1:
        raise ValueError("paper_auc needs at least one value")
    peak = max(values)
    return float(sum(values) / (peak * len(values))) if peak > 0 else 0.0


def tokens_kept(relevance: torch.Tensor, count: int, *, most: bool) -> torch.Tensor:
    """Indices ``[B, count]`` of the ``count`` most (``most``) or least relevant image tokens.

    Ties are broken by token index (stable sort), as in :func:`tokens_to_keep`.
    """
    if not 0 <= count <= relevance.shape[-1]:
        raise ValueError(f"count must lie in 0..{relevance.shape[-1]}, got {count}")
    return torch.sort(relevance, dim=-1, descending=most, stable=True).indices[:, :count]


Direction = Literal["positive", "negative"]
DIRECTIONS: tuple[Direction, ...] = ("positive", "negative")


@dataclass(frozen=True)
class Protocol:
    """One faithfulness protocol: which tokens stay at each step, and how a curve is scored.

    ``kind`` is ``"removed"`` (``steps`` are the fractions removed, the project's protocol) or
    ``"kept"`` (``steps`` are the counts of tokens kept, ``1..N``, the paper's).
    """

    name: str
    kind: Literal["removed", "kept"]
    description: str

    def steps(self, num_tokens: int, fractions: Sequence[float]) -> list[float]:
        return [float(f) for f in fractions] if self.kind == "removed" else [float(n) for n in range(1, num_tokens + 1)]

    def keep(self, relevance: torch.Tensor, step: float, direction: Direction) -> torch.Tensor:
        positive = direction == "positive"
        if self.kind == "removed":
            return tokens_to_keep(relevance, step, positive=positive)
        # Positive perturbation keeps the least relevant tokens, negative the most relevant.
        return tokens_kept(relevance, int(step), most=not positive)

    def curve(
        self, steps: Sequence[float], count: int, accuracy: torch.Tensor, probability: torch.Tensor
    ) -> dict[str, Any]:
        if self.kind == "removed":
            curve = _curve(steps, count, accuracy, probability)
            scores = {name: auc(steps, curve[name]) for name in ("accuracy", "probability")}
        else:
            curve = {"kept": [int(n) for n in steps], "accuracy": accuracy.tolist()}
            curve["probability"] = probability.tolist()
            scores = {name: paper_auc(curve[name]) for name in ("accuracy", "probability")}
        return {**curve, "auc": scores}


PROJECT = Protocol(
    "project", "removed", "remove k = 0, 10, ..., 90 % of the image tokens; trapezoid area over k's range"
)
PAPER = Protocol(
    "paper", "kept", "keep the n = 1..N least (positive) or most (negative) relevant tokens; sum / (max * N)"
)


def _kept_totals(
    model: VisionTransformer, images: torch.Tensor, targets: torch.Tensor, keeps: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kept set, the number of images still classified as their target and the sum of its probability."""
    correct = torch.zeros(len(keeps), dtype=torch.float64)
    probability = torch.zeros(len(keeps), dtype=torch.float64)
    with torch.no_grad():
        for i, keep in enumerate(keeps):
            logits = forward_without_tokens(model, images, keep)
            correct[i] = (logits.argmax(dim=-1) == targets).sum().item()
            probability[i] = logits.softmax(dim=-1).gather(1, targets[:, None]).sum().item()
    return correct, probability


def evaluate_protocols(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    methods: Mapping[str, RelevanceMethod],
    batch_size: int,
    protocols: Sequence[Protocol] = (PROJECT, PAPER),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Positive and negative curves and their scores, per protocol and relevance method.

    Each method is called once per batch as ``method(images, targets)`` with the true labels
    as targets (``[b, 1]``) and must return ``[b, 1, N]``; every protocol is scored on that one
    map. Methods are called with grad mode as the caller left it, so gradient methods must
    enable it themselves (all of :mod:`worker.lens` does). Every batch is scored the same way,
    so the result does not depend on ``batch_size``. ``fractions`` are the removed fractions of
    the project's protocol. Returns ``{protocol: {method: {"positive": curve, "negative": curve}}}``,
    a curve holding its steps (``fractions`` and ``dropped``, or ``kept``), ``accuracy``,
    ``probability`` and ``auc`` (``{"accuracy", "probability"}``, the protocol's score).
    """
    count = _check_inputs(model, images, labels, fractions)
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    steps = {protocol.name: protocol.steps(count, fractions) for protocol in protocols}
    totals: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        targets = labels[start : start + batch_size].to(batch.device)
        for name, method in methods.items():
            relevance = method(batch, targets[:, None])
            if relevance.shape != (len(batch), 1, count):
                raise ValueError(
                    f"method {name!r} returned {list(relevance.shape)}, expected [{len(batch)}, 1, {count}]"
                )
            relevance = relevance[:, 0].detach().to(batch.device)
            for protocol, direction in itertools.product(protocols, DIRECTIONS):
                keeps = [protocol.keep(relevance, step, direction) for step in steps[protocol.name]]
                found = _kept_totals(model, batch, targets, keeps)
                key = (protocol.name, name, direction)
                totals[key] = [a + b for a, b in zip(totals[key], found, strict=True)] if key in totals else list(found)

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol in protocols:
        results[protocol.name] = {}
        for name in methods:
            results[protocol.name][name] = {}
            for direction in DIRECTIONS:
                correct, probability = totals[protocol.name, name, direction]
                results[protocol.name][name][direction] = protocol.curve(
                    steps[protocol.name], count, correct / len(images), probability / len(images)
                )
    return results


def evaluate_methods(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    methods: Mapping[str, RelevanceMethod],
    batch_size: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, dict[str, Any]]:
    """The project's protocol alone (:func:`evaluate_protocols`). Returns, per method::

    {"positive": {"fractions", "dropped", "accuracy", "probability",
                  "auc": {"accuracy": float, "probability": float}},
     "negative": {...}}
    """
    return evaluate_protocols(model, images, labels, methods, batch_size, (PROJECT,), fractions)[PROJECT.name]
