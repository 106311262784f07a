"""Audits: many images through the one explain entry point, summarised per image and overall.

The task (:func:`worker.jobs.audit.audit_job`) feeds batches to :func:`explain_batch` and turns
what comes back into :class:`~classlens.core.contract.AuditRow` with :func:`audit_row`; once all
batches are done, :func:`aggregate` summarises the rows. Everything but
:func:`explain_batch` is plain arithmetic over the contract's models, so it is tested and
reasoned about without a model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from classlens.core.contract import (
    AuditAggregates,
    AuditImage,
    AuditRow,
    ClassEmergence,
    ClassScore,
    ConfusionCell,
    ExplainRequest,
    Explanation,
    RelevanceLocation,
    TargetExplanation,
)
from classlens.core.monitoring import margin, signals
from worker.lens.regions import central_box
from worker.runtime import LoadedViT

_DECIMALS = 6


@dataclass
class Explained:
    """One image's explanation, with every class explained for it (from one or two passes) by index."""

    explanation: Explanation
    targets: dict[int, TargetExplanation] = field(default_factory=dict)

    @property
    def predicted(self) -> int:
        return self.explanation.prediction[0].index


def explained_class(request: ExplainRequest, predicted: int, true_label: int | None) -> int:
    """The class whose map says where the relevance lies: the first explicit target, else the true class,
    else the prediction (the default the audit's parameters document)."""
    if request.targets:
        first = request.targets[0]
        assert isinstance(first, int), "audit targets are canonical class indices"
        return first
    return true_label if true_label is not None else predicted


def explain_batch(
    model: LoadedViT, images: Sequence[Image.Image], true_labels: Sequence[int | None], request: ExplainRequest
) -> list[Explained]:
    """Explain a batch so that every image has its predicted class, its true class and the requested targets.

    The lens explains one set of targets for the whole batch, and the predicted class is only
    known after the forward pass, so one pass may not cover everything. A second pass explains
    the missing classes, grouped so that images missing the same classes share a batch; a
    correctly classified image without explicit targets needs no second pass.
    """
    found = [Explained(e, {t.index: t for t in e.targets}) for e in model.explain(images, request)]
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, (item, truth) in enumerate(zip(found, true_labels, strict=True)):
        wanted = [item.predicted, *([truth] if truth is not None else [])]
        missing = tuple(dict.fromkeys(c for c in wanted if c not in item.targets))
        if missing:
            groups[missing].append(position)
    for classes, members in groups.items():
        again = model.explain([images[i] for i in members], request.model_copy(update={"targets": list(classes)}))
        for position, explanation in zip(members, again, strict=True):
            found[position].targets.update({t.index: t for t in explanation.targets})
    return found


def central_mask(height: int, width: int) -> np.ndarray:
    """The cells of :func:`worker.lens.regions.central_box` on a ``height x width`` grid, as a boolean mask.

    On a coarse grid they cover a little less than the box's quarter of the area (9 of 49 on
    7x7, 36 of 196 on 14x14), which is why results report that share (``central_cells_share``)
    as the baseline a uniform map gets.
    """
    row0, col0, row1, col1 = central_box((height, width))
    mask = np.zeros((height, width), dtype=bool)
    mask[row0:row1, col0:col1] = True
    return mask


def locate_relevance(values: Sequence[Sequence[float]]) -> RelevanceLocation:
    """The peak cell of a projection map and the share of its relevance mass in the central box.

    - peak: the (row, col) of the map's maximum; on ties the first in row-major order, and
      ``peak_ties`` counts the cells equal to the maximum (1: the peak is unique), so that a map
      flat at its top (identifiability is 1.0 wherever the class is top-1) says that its peak
      means nothing rather than naming the top-left corner;
    - relevance mass: the map's positive part (negative values, possible for logit maps, say
      "against the class" and are not mass), summed over cells;
    - ``central_share``: the mass in the cells of :func:`central_mask` divided by all the mass
      (the border's share is ``1 - central_share``); null when the map has no positive mass.
    """
    grid = np.asarray(values, dtype=np.float64)
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    mass = np.clip(grid, 0, None)
    total = float(mass.sum())
    share = None if total <= 0 else round(float(mass[central_mask(*grid.shape)].sum()) / total, _DECIMALS)
    ties = int(np.count_nonzero(grid == grid.max()))
    return RelevanceLocation(peak_row=int(row), peak_col=int(col), peak_ties=ties, central_share=share)


def thirds(size: int) -> np.ndarray:
    """The third (0, 1, 2) of an axis of ``size`` cells that each cell's centre lies in: 2-3-2 of 7, 5-4-5 of 14.

    By the centre, in integers (``floor(3 (2 i + 1) / (2 size))``), so that the split is symmetric
    and no rounding decides a cell.
    """
    return (3 * (2 * np.arange(size) + 1)) // (2 * size)


def region_shares(values: Sequence[Sequence[float]]) -> list[list[float]] | None:
    """The map's positive mass (as in :func:`locate_relevance`) in each of 3 x 3 regions, as shares of the total.

    Rows top to bottom, columns left to right; the regions are the thirds of each axis by
    :func:`thirds`. Null when the map has no positive mass.
    """
    mass = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    total = float(mass.sum())
    if total <= 0:
        return None
    rows, cols = thirds(mass.shape[0]), thirds(mass.shape[1])
    regions = np.zeros((3, 3))
    np.add.at(regions, (rows[:, None], cols[None, :]), mass)
    return np.round(regions / total, _DECIMALS).tolist()


def top_classes(explained: Explained, k: int) -> list[ClassScore]:
    """The ``k`` best classes of the model's output, best first, from what the explanation knows of them.

    The explanation lists the top 5 (``prediction``) and every explained class with its rank;
    without explicit targets an audit explains its top ``k``, so the list is complete. With
    explicit targets and ``k`` above 5 it holds the classes known to rank below ``k``.
    """
    known = {score.index: (position, score) for position, score in enumerate(explained.explanation.prediction)}
    for target in explained.targets.values():
        score = ClassScore(index=target.index, label=target.label, probability=target.probability, logit=target.logit)
        known.setdefault(target.index, (target.rank, score))
    ranked = sorted(known.values(), key=lambda entry: entry[0])
    return [
        score.model_copy(
            update={"probability": round(score.probability, _DECIMALS), "logit": round(score.logit, _DECIMALS)}
        )
        for rank, score in ranked[:k]
        if rank < k
    ]


def relevance_layer(explanation: Explanation, target: TargetExplanation) -> str:
    """The last block's map when it was computed (audits always ask for it), else the deepest one there is."""
    maps = target.projection_maps
    return str(explanation.layers) if str(explanation.layers) in maps else max(maps, key=int)


def audit_row(item: AuditImage, explained: Explained, request: ExplainRequest, labels: Sequence[str]) -> AuditRow:
    """One image's row: prediction, its confidence, correctness, emergence layers and where the relevance lies.

    The location columns and ``map`` read the explained class's map at the last block, of the
    request's ``map_kind`` (which the row names): for an audit submitted through the API, the
    probability map (:data:`~classlens.core.contract.AUDIT_MAP_KIND`). Identifiability, the
    explanation's default, is a rank: 1.0 at every token where the class is top-1, which at the
    last block of a trained model is most of the grid, so its peak is a tie-break and its mass is
    spread evenly. The token's probability of the class keeps the differences between top-1
    tokens, is never negative (the whole map is mass, where a logit map's positive part depends on
    an offset that the softmax ignores) and lies in [0, 1] for every model. Where it too is flat at
    its top (a token certain to 4 decimals), ``peak_ties`` says so.
    """
    explanation = explained.explanation
    top = explanation.prediction[0]
    truth = item.label
    chosen = explained.targets[explained_class(request, top.index, truth)]
    by_layer = {layer: locate_relevance(values) for layer, values in chosen.projection_maps.items()}
    layer = relevance_layer(explanation, chosen)
    last = by_layer[layer]
    assert explanation.entropy is not None, "the lens reports every explanation's entropy"
    return AuditRow(
        file=item.file,
        true_index=truth,
        true_label=None if truth is None else labels[truth],
        predicted_index=top.index,
        predicted_label=top.label,
        probability=round(top.probability, _DECIMALS),
        confidence=round(top.probability, _DECIMALS),
        margin=margin(explanation.prediction),
        entropy=round(explanation.entropy, _DECIMALS),
        top_k=top_classes(explained, request.top_k),
        correct=None if truth is None else top.index == truth,
        predicted_emergence_layer=explained.targets[top.index].emergence_layer,
        true_emergence_layer=None if truth is None else explained.targets[truth].emergence_layer,
        explained_index=chosen.index,
        explained_label=chosen.label,
        map_kind=explanation.map_kind,
        peak_row=last.peak_row,
        peak_col=last.peak_col,
        peak_ties=last.peak_ties,
        central_share=last.central_share,
        border_share=None if last.central_share is None else round(1 - last.central_share, _DECIMALS),
        region_shares=region_shares(chosen.projection_maps[layer]),
        relevance_by_layer=by_layer,
        map=[[round(value, _DECIMALS) for value in row] for row in chosen.projection_maps[layer]],
        signals=signals(explained.explanation, explained.targets[top.index]),
    )


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), _DECIMALS) if values else None


def aggregate(rows: Sequence[AuditRow], labels: Sequence[str], depth: int, grid: tuple[int, int]) -> AuditAggregates:
    """Accuracy and confusion over labelled rows; emergence, confidence, margin and entropy over all rows."""
    labelled = [row for row in rows if row.true_index is not None]
    correct = sum(1 for row in labelled if row.correct)
    pairs = Counter((row.true_index, row.predicted_index) for row in labelled)
    confusion = [
        ConfusionCell(
            true_index=truth, true_label=labels[truth], predicted_index=pred, predicted_label=labels[pred], count=n
        )
        for (truth, pred), n in sorted(pairs.items())
        if truth is not None
    ]
    by_class: dict[int, list[int | None]] = defaultdict(list)
    for row in rows:
        by_class[row.predicted_index].append(row.predicted_emergence_layer)
    emergence = [
        ClassEmergence(
            index=index,
            label=labels[index],
            images=len(layers),
            mean_emergence_layer=_mean([layer for layer in layers if layer is not None]),
            never=sum(1 for layer in layers if layer is None),
        )
        for index, layers in sorted(by_class.items())
    ]
    histogram = {str(layer): 0 for layer in range(depth + 1)} | {"never": 0}
    for row in rows:
        key = "never" if row.predicted_emergence_layer is None else str(row.predicted_emergence_layer)
        histogram[key] = histogram.get(key, 0) + 1
    shares = [row.central_share for row in rows if row.central_share is not None]
    mask = central_mask(*grid)
    return AuditAggregates(
        images=len(rows),
        labelled=len(labelled),
        correct=correct,
        accuracy=round(correct / len(labelled), _DECIMALS) if labelled else None,
        confusion=confusion,
        mean_emergence_by_class=emergence,
        emergence_histogram=histogram,
        mean_top1_probability=_mean([row.probability for row in rows]) or 0.0,
        mean_margin=_mean([row.margin for row in rows]),
        mean_entropy=_mean([row.entropy for row in rows]),
        mean_central_share=_mean(shares),
        central_cells_share=round(float(mask.mean()), _DECIMALS),
    )
