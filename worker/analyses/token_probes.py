"""Linear probes at every layer and token position, beside the class-embedding projection
(docs/methods.md, "Linear probes per token position"; Vilas et al., NeurIPS 2023, section 1,
"Linear-probe comparison").

For every layer ``b = 0 .. L`` (``x_0`` the embedding, ``x_b`` the residual stream after block
``b``) and every position ``t`` (the CLS token, when the model has one, and each image token),
a closed-form ridge probe (:func:`worker.analyses.probes.fit_ridge`) maps ``x_b[t]`` to one-hot
labels. Two probes per layer and position: *full*, fitted on every fitting image, and
*few-shot*, fitted on the first :data:`FEW_SHOT` fitting images of each class (in request
order), as the reference code's ``n=10`` training set. Both are scored on the held-out images
(:func:`worker.analyses.layer_probes.held_out`: image ``i`` when ``i % 4 == 3``), beside the
projection's top-1 accuracy ``argmax_c z_c(x_b[t]) == label`` on the same images (fresh
final-norm statistics, head bias; the main head for distilled models).

Probe relevance map at a chosen layer ``b``: for a held-out image and its true class ``c``, the
full probe of position ``j`` scores ``c`` at ``x_b[j]``, for every image token ``j`` (the
reference code ranks ``c`` under the same position-specific probes). Beside it the projection
map ``z_c(x_b[j])``, the target's logit. Both are scored by token-removal faithfulness
(:func:`worker.lens.faithfulness.evaluate_methods`) on the held-out images, with a seeded random
order as the floor.

Memory. The features of every image at every position of a layer (``m x T x D`` float32) are
kept for the fits; the layers are taken in groups that fit :data:`FEATURE_BUDGET_BYTES`, one pass
over the images per group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.analyses.layer_probes import held_out
from worker.analyses.probes import RidgeProbe, fit_ridge
from worker.lens.baselines import random_relevance
from worker.lens.faithfulness import DEFAULT_FRACTIONS, auc, evaluate_methods
from worker.lens.projection import ClassProjection
from worker.lens.vit import ViTSpec, inspect_vit, trace

FEW_SHOT = 10  # fitting images per class of the few-shot probes
FEATURE_BUDGET_BYTES = 512 * 2**20  # features kept at once; more layers than fit take more passes
RANDOM_SEED = 0  # the random token order of the faithfulness floor

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""A fresh iterator over ``(images, labels)`` batches, in request order, for each pass."""


def few_shot_rows(labels: torch.Tensor, fitting: torch.Tensor, per_class: int = FEW_SHOT) -> torch.Tensor:
    """``[m]`` bool: the first ``per_class`` fitting images of each class, in request order."""
    chosen = torch.zeros_like(fitting)
    seen: dict[int, int] = {}
    for index in torch.nonzero(fitting).flatten().tolist():
        label = int(labels[index])
        if seen.get(label, 0) < per_class:
            chosen[index] = True
            seen[label] = seen.get(label, 0) + 1
    return chosen


def positions(spec: ViTSpec) -> list[str]:
    """The positions probed: ``"cls"`` (when the first prefix token is one), then ``"0" .. "N-1"``."""
    prefix = ["cls"] if spec.prefix_tokens[:1] == ("cls",) else []
    return prefix + [str(j) for j in range(spec.num_image_tokens)]


def _token_index(spec: ViTSpec) -> list[int]:
    """Sequence index of every probed position."""
    prefix = [0] if spec.prefix_tokens[:1] == ("cls",) else []
    return prefix + list(range(spec.num_prefix, spec.num_prefix + spec.num_image_tokens))


def layer_groups(
    layers: int, images: int, tokens: int, width: int, budget: int = FEATURE_BUDGET_BYTES
) -> list[list[int]]:
    """Layers ``0 .. layers-1`` in consecutive groups whose float32 features fit ``budget`` (at least one each)."""
    per_layer = images * tokens * width * 4
    size = max(1, budget // max(per_layer, 1))
    return [list(range(start, min(start + size, layers))) for start in range(0, layers, size)]


@dataclass
class _Pass:
    """What one pass over the images keeps for its group of layers."""

    features: dict[int, list[torch.Tensor]]  # layer -> batches of [B, P', D] float32
    projected: dict[int, list[torch.Tensor]]  # layer -> batches of [B, P'] projection top-1
    target_logits: list[torch.Tensor] = field(default_factory=list)  # batches of [B, N] z_c(x_b[j]) at the map layer
    labels: list[torch.Tensor] = field(default_factory=list)


def _collect(
    model: VisionTransformer, batches: Batches, group: list[int], map_layer: int, projection: ClassProjection
) -> _Pass:
    spec = projection.spec
    index = torch.tensor(_token_index(spec))
    kept = _Pass({b: [] for b in group}, {b: [] for b in group})
    with torch.no_grad():
        for images, labels in batches():
            residual = trace(model, images, sublayers=False).residual  # [B, L + 1, T, D]
            for b in group:
                tokens = residual[:, b, index.to(residual.device)]
                kept.features[b].append(tokens.float().cpu())
                kept.projected[b].append(projection(tokens).argmax(dim=-1).cpu())
            if map_layer in group:
                logits = projection(residual[:, map_layer, spec.num_prefix :])  # [B, N, C]
                target = labels.to(logits.device)[:, None, None].expand(-1, logits.shape[1], 1)
                kept.target_logits.append(logits.gather(-1, target)[..., 0].float().cpu())
            kept.labels.append(labels.cpu())
    return kept


def _scores(probe: RidgeProbe, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The probe's score of ``classes[i]`` for row ``i`` of ``features``: ``[m]``."""
    centred = features.to(torch.float64) - probe.feature_mean
    weights = probe.weights[:, classes].T  # [m, D]
    return (centred * weights).sum(dim=-1) + probe.target_mean[classes]


@dataclass(frozen=True)
class TokenProbes:
    positions: list[str]
    accuracy: dict[str, list[list[float]]]  # "probe", "few_shot", "projection" -> [L + 1][positions]
    train: int
    few_shot_train: int
    test: int
    map_layer: int
    probe_maps: torch.Tensor  # [test, N]: the full probes' score of the label at the map layer
    projection_maps: torch.Tensor  # [test, N]: z_c(x_b[j]) at the map layer


def passes(spec: ViTSpec, count: int) -> int:
    """How many passes over ``count`` images :func:`token_probes` makes for a model of layout ``spec``."""
    return len(layer_groups(spec.depth + 1, count, len(positions(spec)), spec.width))


def token_probes(
    model: VisionTransformer, batches: Batches, count: int, num_classes: int, map_layer: int, ridge: float = 1.0
) -> TokenProbes:
    """Probe and projection accuracy per layer and position over ``count`` images, and the maps at ``map_layer``.

    ``batches`` is called once per group of layers (:func:`layer_groups`, :func:`passes`).
    """
    projection = ClassProjection(model)
    spec = inspect_vit(model)
    names = positions(spec)
    test = held_out(count)
    if not test.any() or test.all():
        raise ValueError(f"{count} images cannot be split into a fitting and a held-out part")
    accuracy: dict[str, list[list[float]]] = {"probe": [], "few_shot": [], "projection": []}
    probe_maps = projection_maps = torch.zeros(0)
    few = torch.zeros_like(test)
    for group in layer_groups(spec.depth + 1, count, len(names), spec.width):
        kept = _collect(model, batches, group, map_layer, projection)
        truth = torch.cat(kept.labels)
        if len(truth) != count:
            raise ValueError(f"{len(truth)} images in the batches, {count} expected")
        few = few_shot_rows(truth, ~test)
        fits = _Fits(truth, test, few, num_classes, ridge)
        for b in group:
            row, maps = fits.layer(torch.cat(kept.features[b]), torch.cat(kept.projected[b]), b == map_layer)
            for key, values in row.items():
                accuracy[key].append(values)
            if b == map_layer:
                probe_maps = maps[:, int(names[0] == "cls") :]
                projection_maps = torch.cat(kept.target_logits)[test]
    return TokenProbes(
        names, accuracy, int((~test).sum()), int(few.sum()), int(test.sum()), map_layer, probe_maps, projection_maps
    )


@dataclass(frozen=True)
class _Fits:
    """The probes of one layer: the labels, which rows fit and which score."""

    truth: torch.Tensor
    test: torch.Tensor
    few: torch.Tensor
    num_classes: int
    ridge: float

    def layer(
        self, features: torch.Tensor, projected: torch.Tensor, with_maps: bool
    ) -> tuple[dict[str, list[float]], torch.Tensor]:
        """Accuracy per position of the full and few-shot probes and of the projection; the full probes' maps.

        ``features`` ``[m, P', D]``, ``projected`` ``[m, P']``; the maps are ``[test, P']`` (empty unless asked).
        """
        truth, test = self.truth, self.test
        row: dict[str, list[float]] = {"probe": [], "few_shot": [], "projection": []}
        maps = []
        for t in range(features.shape[1]):
            x = features[:, t]
            full = fit_ridge(x[~test], truth[~test], self.num_classes, self.ridge)
            shot = fit_ridge(x[self.few], truth[self.few], self.num_classes, self.ridge)
            row["probe"].append(_hits(full.predict(x[test]), truth[test]))
            row["few_shot"].append(_hits(shot.predict(x[test]), truth[test]))
            row["projection"].append(_hits(projected[test, t], truth[test]))
            if with_maps:
                maps.append(_scores(full, x[test], truth[test]))
        return row, torch.stack(maps, dim=-1).float() if maps else torch.zeros(0)


def _hits(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted.cpu() == truth.cpu()).double().mean())


def map_faithfulness(
    model: VisionTransformer,
    held_out_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    maps: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, Any]]:
    """Token-removal curves and AUCs of precomputed maps (``[test, N]`` each, rows in batch order).

    ``held_out_batches`` yields the held-out images and labels in the order of the maps' rows.
    Curves of each batch are weighted by its images; a seeded random order (``"random"``) is added.
    """
    spec = inspect_vit(model)
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    sums: dict[tuple[str, str, str], torch.Tensor] = {}
    seen = 0
    for images, labels in held_out_batches:
        rows = slice(seen, seen + len(images))
        methods = {name: _lookup(values[rows]) for name, values in maps.items()}
        methods["random"] = lambda batch, targets: random_relevance(batch, targets, spec.num_image_tokens, generator)
        curves = evaluate_methods(model, images, labels, methods, batch_size=len(images))
        for name, directions in curves.items():
            for direction, curve in directions.items():
                for measure in ("accuracy", "probability"):
                    key = (name, direction, measure)
                    values = torch.tensor(curve[measure], dtype=torch.float64) * len(images)
                    sums[key] = sums[key] + values if key in sums else values
        seen += len(images)
    if not seen:
        raise ValueError("no held-out images to remove tokens from")
    results: dict[str, dict[str, Any]] = {}
    for (name, direction, measure), total in sums.items():
        curve = results.setdefault(name, {}).setdefault(direction, {"fractions": list(DEFAULT_FRACTIONS), "auc": {}})
        curve[measure] = (total / seen).tolist()
        curve["auc"][measure] = auc(DEFAULT_FRACTIONS, curve[measure])
    return results


def _lookup(values: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A relevance method that answers with the precomputed maps of the batch: ``[b, 1, N]``."""

    def method(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return values[:, None].to(images.device)

    return method
