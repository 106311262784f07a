"""Per-layer linear probes next to the class-embedding projection's accuracy (docs/methods.md,
"Per-layer linear probes"; section 1, "Linear-probe comparison").

For every block ``b`` a closed-form ridge probe (:mod:`worker.analyses.probes`) is fitted per
position and scored on held-out images; beside it, the projection's accuracy at the same
layer: the arg-max of :meth:`worker.lens.projection.ClassProjection.pooled` on ``x_b`` (the
model's own read-out of its last layer applied to layer ``b``: fresh final-norm statistics,
head bias included) against the label, on the same held-out images.

Positions. ViT: ``"cls"`` (the first prefix token), ``"gap"`` (mean of the image tokens),
``"token"`` (the single image token at the grid centre, row ``h // 2``, column ``w // 2``).
CNN: ``"gap"`` (global average of the feature map) and ``"map"`` (the flattened map); a CNN
has no projection.

Split: image ``i`` (in the order given) is held out when ``i % 4 == 3``, a quarter; the probe
is fitted on the other three quarters. Interleaving keeps the split even when the images
arrive sorted by class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.analyses.probes import probe_accuracy
from worker.analyses.representations import LayerSpec, Representation, describe, reduce, run_layers
from worker.lens.projection import ClassProjection
from worker.lens.vit import UnsupportedModelError

HELD_OUT_EVERY = 4  # image i is held out when i % 4 == 3
SPLIT_RULE = "image i (in request order) is held out for scoring when i % 4 == 3; the probe is fitted on the rest"


def held_out(count: int) -> torch.Tensor:
    """``[count]`` bool: which images score the probes (and the projection)."""
    return torch.arange(count) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def probe_positions(spec: LayerSpec, representation: Representation) -> list[str]:
    """The positions probed: all of the model's for ``"tokens"``, else just the one asked for."""
    available = ["cls", "gap", "token"] if spec.kind == "vit" else ["gap", "map"]
    if spec.kind == "vit" and not spec.num_prefix:
        available.remove("cls")
    if representation == "tokens":
        return available
    if representation not in available:
        raise ValueError(f"this model has no {representation!r} position to probe (it has {available})")
    return [representation]


def _position(raw: torch.Tensor, position: str, spec: LayerSpec) -> torch.Tensor:
    if position == "token":
        assert spec.grid is not None
        h, w = spec.grid
        return raw[:, spec.num_prefix + (h // 2) * w + w // 2]
    if position == "map":
        return reduce(raw, "tokens", spec)
    return reduce(raw, "cls" if position == "cls" else "gap", spec)


@dataclass(frozen=True)
class ProbeCurves:
    layers: list[str]
    positions: list[str]
    accuracy: dict[str, list[float]]  # position -> per layer, on held-out images
    projection: list[float] | None  # per layer, on the same held-out images; None for CNNs
    train: int
    test: int


def layer_probes(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    representation: Representation = "tokens",
    ridge: float = 1.0,
) -> ProbeCurves:
    """Probe accuracy per layer and position, and the projection's, over ``(images, labels)`` batches."""
    spec = describe(model)
    positions = probe_positions(spec, representation)
    projection = None
    if isinstance(model, VisionTransformer):
        try:
            projection = ClassProjection(model)
        except (UnsupportedModelError, ValueError):
            projection = None  # a ViT the lens cannot read out: probes only
    features: dict[tuple[str, str], list[torch.Tensor]] = {(p, n): [] for p in positions for n in spec.names}
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in spec.names}
    labels: list[torch.Tensor] = []

    def keep(name: str, raw: torch.Tensor) -> None:
        for position in positions:
            features[position, name].append(_position(raw, position, spec).float().cpu())
        if projection is not None:
            predictions[name].append(projection.pooled(raw).argmax(dim=-1).cpu())

    for images, batch_labels in batches:
        run_layers(model, images, keep, spec)
        labels.append(batch_labels.cpu())
    truth = torch.cat(labels)
    test = held_out(len(truth))
    if not test.any() or test.all():
        raise ValueError(f"{len(truth)} images cannot be split into a fitting and a held-out part")
    accuracy = {position: [] for position in positions}  # type: dict[str, list[float]]
    for position in positions:
        for name in spec.names:
            x = torch.cat(features[position, name])
            accuracy[position].append(probe_accuracy(x[~test], truth[~test], x[test], truth[test], num_classes, ridge))
    projected = None
    if projection is not None:
        projected = [float((torch.cat(predictions[n])[test] == truth[test]).double().mean()) for n in spec.names]
    return ProbeCurves(list(spec.names), positions, accuracy, projected, int((~test).sum()), int(test.sum()))
