"""The arithmetic of an audit row: the map its location columns read, the tie rule, the regions, the
top-k classes, margin and entropy, the aggregates over rows and their rows.csv cells.

Rows are built from hand-made explanations (no model), except for the entropy, which the lens
computes and is checked against the softmax of a real (random) ViT's output.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from classlens.core.audit_report import CSV_COLUMNS, rows_csv
from classlens.core.contract import (
    AUDIT_MAP_KIND,
    AuditImage,
    AuditRow,
    ClassScore,
    ExplainRequest,
    Explanation,
    MapKind,
    ModelRef,
    StreamStats,
    TargetExplanation,
)
from service.model_info import ModelInfo
from service.routes.audits import audit_request
from worker import random_models
from worker.audits import Explained, aggregate, audit_row, locate_relevance, margin, region_shares, thirds
from worker.lens.explain import explain

LABELS = [f"class {i}" for i in range(6)]
DEPTH = 2
GRID = (7, 7)
REF = ModelRef(name="tiny", version="1", weights_sha256="0" * 64)
# At the last block of a trained model the class is top-1 at most tokens: identifiability 1.0 there.
SATURATED = [[1.0] * 7 for _ in range(7)]
SATURATED[6][6] = 0.5


def grid_map(peak: tuple[int, int], value: float = 0.9, rest: float = 0.1) -> list[list[float]]:
    values = [[rest] * GRID[1] for _ in range(GRID[0])]
    values[peak[0]][peak[1]] = value
    return values


def target(index: int, rank: int, probability: float, maps: dict[str, list[list[float]]]) -> TargetExplanation:
    stats = StreamStats(prefix_ranks={"cls": [rank] * (DEPTH + 1)}, image_identifiability=[], image_top1_share=[])
    return TargetExplanation(
        index=index,
        label=LABELS[index],
        probability=probability,
        logit=math.log(probability),
        rank=rank,
        emergence_layer=1 if rank == 0 else None,
        pooled_ranks=[rank] * (DEPTH + 1),
        residual=stats,
        projection_maps=maps,
    )


def explained(
    probabilities: list[float],
    maps: dict[int, dict[str, list[list[float]]]],
    map_kind: MapKind = AUDIT_MAP_KIND,
    entropy: float = 0.5,
) -> Explained:
    """An explanation whose output is ``probabilities`` (by class index), explaining the classes of ``maps``."""
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])
    prediction = [
        ClassScore(index=i, label=LABELS[i], probability=probabilities[i], logit=math.log(probabilities[i]))
        for i in order[:5]
    ]
    targets = [target(i, order.index(i), probabilities[i], by_layer) for i, by_layer in maps.items()]
    explanation = Explanation(
        model=REF,
        norm="fresh",
        bias=True,
        map_kind=map_kind,
        grid=GRID,
        patch_size=(4, 4),
        prefix_tokens=["cls"],
        layers=DEPTH,
        pooling="token",
        prediction=prediction,
        targets=targets,
        entropy=entropy,
    )
    return Explained(explanation, {t.index: t for t in targets})


PROBABILITIES = [0.02, 0.6, 0.25, 0.05, 0.05, 0.03]  # top-1 class 1, top-2 class 2


def row_of(found: Explained, label: int | None = 1, request: ExplainRequest | None = None) -> AuditRow:
    request = request or ExplainRequest(top_k=3, layers=[DEPTH], map_kind=AUDIT_MAP_KIND, sublayers=False)
    return audit_row(AuditImage(file="a.png", image_key="k", label=label), found, request, LABELS)


# -- the tie rule ------------------------------------------------------------------------------------


def test_a_unique_peak_is_named_with_one_tie():
    location = locate_relevance(grid_map((4, 5)))
    assert (location.peak_row, location.peak_col, location.peak_ties) == (4, 5, 1)


def test_a_flat_top_names_its_first_cell_in_row_major_order_and_counts_the_ties():
    location = locate_relevance(SATURATED)
    assert (location.peak_row, location.peak_col) == (0, 0)
    assert location.peak_ties == 48
    values = grid_map((5, 2), value=0.9)
    values[3][6] = 0.9
    location = locate_relevance(values)
    assert (location.peak_row, location.peak_col, location.peak_ties) == (3, 6, 2)


def test_negative_values_are_not_mass():
    values = [[-1.0] * 7 for _ in range(7)]
    values[3][3] = 2.0  # the centre: all the positive mass
    assert locate_relevance(values).central_share == 1.0
    assert region_shares(values) == [[0.0] * 3, [0.0, 1.0, 0.0], [0.0] * 3]
    nothing = [[-1.0] * 7 for _ in range(7)]
    assert locate_relevance(nothing).central_share is None
    assert region_shares(nothing) is None


# -- the regions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "counts"), [(7, [2, 3, 2]), (14, [5, 4, 5]), (3, [1, 1, 1]), (16, [5, 6, 5])])
def test_thirds_split_an_axis_symmetrically_by_the_cells_centres(size, counts):
    parts = thirds(size)
    assert np.bincount(parts, minlength=3).tolist() == counts
    assert np.all(np.diff(parts) >= 0)


def test_a_uniform_map_s_regions_hold_their_share_of_the_cells():
    shares = region_shares([[0.3] * 7 for _ in range(7)])
    expected = np.outer([2, 3, 2], [2, 3, 2]) / 49
    assert np.allclose(shares, expected, atol=1e-6)
    assert sum(map(sum, shares)) == pytest.approx(1, abs=1e-5)


def test_on_7x7_the_middle_region_is_the_central_box():
    values = np.random.default_rng(0).random(GRID).tolist()
    shares = region_shares(values)
    assert shares is not None
    assert shares[1][1] == pytest.approx(locate_relevance(values).central_share, abs=1e-6)


# -- margin, top-k, entropy ------------------------------------------------------------------------------


def test_margin_is_top1_minus_top2_probability():
    scores = [ClassScore(index=i, label=LABELS[i], probability=p, logit=0.0) for i, p in enumerate([0.7, 0.2])]
    assert margin(scores) == pytest.approx(0.5)
    assert margin(scores[:1]) == pytest.approx(0.7)  # one class: nothing to lose to


def test_a_row_s_confidence_margin_entropy_and_top_k():
    found = explained(PROBABILITIES, {1: {str(DEPTH): grid_map((2, 3))}}, entropy=1.234567891)
    row = row_of(found)
    assert row.confidence == row.probability == 0.6
    assert row.margin == pytest.approx(0.35)
    assert row.entropy == 1.234568
    assert [(score.index, score.probability) for score in row.top_k] == [(1, 0.6), (2, 0.25), (3, 0.05)]
    assert row_of(found, request=ExplainRequest(top_k=1, layers=[DEPTH])).top_k == row.top_k[:1]


def test_top_k_reaches_past_the_top_five_through_the_explained_classes():
    """The prediction lists five classes; without targets an audit explains its top k, which may be more."""
    request = ExplainRequest(top_k=6, layers=[DEPTH])
    last = {str(DEPTH): grid_map((0, 0))}
    five = explained(PROBABILITIES, {1: last})
    assert [score.index for score in row_of(five, request=request).top_k] == [1, 2, 3, 4, 5]
    six = explained(PROBABILITIES, {1: last, 0: last})  # class 0, the sixth best, explained too
    assert [score.index for score in row_of(six, request=request).top_k] == [1, 2, 3, 4, 5, 0]


def test_the_lens_reports_the_entropy_of_the_softmax_over_all_classes():
    model = random_models.random_vit(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=12
    )
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = [f"class {i}" for i in range(12)]
    results = explain(model, images, labels, ExplainRequest(top_k=1, sublayers=False), REF)
    with torch.no_grad():
        probabilities = model(images).double().softmax(-1).numpy()
    expected = -(probabilities * np.log(probabilities)).sum(-1)
    assert [result.entropy for result in results] == pytest.approx(
        expected.tolist(), abs=6e-5
    )  # the lens rounds it to 4 decimals
    assert all(0 < result.entropy <= math.log(12) for result in results)


# -- the map the location columns read ----------------------------------------------------------------


def test_the_location_columns_read_the_row_s_map_and_name_its_kind():
    maps = {"1": grid_map((6, 0)), str(DEPTH): grid_map((2, 3))}
    row = row_of(explained(PROBABILITIES, {1: maps}))
    assert row.map_kind == AUDIT_MAP_KIND == "probability"
    assert row.map == maps[str(DEPTH)]
    assert (row.peak_row, row.peak_col, row.peak_ties) == (2, 3, 1)
    assert row.relevance_by_layer["1"].peak_row == 6
    assert row.relevance_by_layer[str(DEPTH)].peak_ties == row.peak_ties
    assert row.central_share == locate_relevance(row.map).central_share
    assert row.region_shares == region_shares(row.map)


def test_a_row_of_a_saturated_map_says_its_peak_is_a_tie_break():
    row = row_of(explained(PROBABILITIES, {1: {str(DEPTH): SATURATED}}, map_kind="identifiability"))
    assert row.map_kind == "identifiability"
    assert (row.peak_row, row.peak_col, row.peak_ties) == (0, 0, 48)


def test_the_api_s_audits_ask_for_the_probability_map():
    info = ModelInfo(grid=GRID, layers=DEPTH)
    request = audit_request({}, LABELS, info)
    assert request.map_kind == AUDIT_MAP_KIND
    assert (request.top_k, request.layers, request.sublayers) == (1, [DEPTH], False)
    assert audit_request({"targets": ["class 2"], "layers": [1]}, LABELS, info).layers == [1, DEPTH]


# -- aggregates and rows.csv ------------------------------------------------------------------------------


def test_aggregates_average_margin_and_entropy():
    rows = [
        row_of(explained(PROBABILITIES, {1: {str(DEPTH): grid_map((2, 3))}}, entropy=1.0)),
        row_of(explained([0.9, 0.02, 0.02, 0.02, 0.02, 0.02], {0: {str(DEPTH): grid_map((3, 3))}}, entropy=0.4), 0),
    ]
    aggregates = aggregate(rows, LABELS, DEPTH, GRID)
    assert aggregates.mean_margin == pytest.approx((0.35 + 0.88) / 2)
    assert aggregates.mean_entropy == pytest.approx(0.7)
    assert aggregate([], LABELS, DEPTH, GRID).mean_entropy is None


def test_rows_csv_holds_the_new_scalars_and_top_k_in_one_cell():
    found = explained(PROBABILITIES, {1: {str(DEPTH): grid_map((2, 3))}})
    row = row_of(found)
    labels = {**row.model_dump(mode="json"), "top_k": [{**row.top_k[0].model_dump(), "label": "=SUM(A1)"}]}
    text = rows_csv({"rows": [row.model_dump(mode="json"), labels]})
    first, second = csv.DictReader(io.StringIO(text))
    assert list(first) == list(CSV_COLUMNS)
    assert first["top_k"] == "class 1:0.6;class 2:0.25;class 3:0.05"
    assert (first["map_kind"], first["peak_ties"], first["margin"]) == ("probability", "1", "0.35")
    assert first["confidence"] == first["probability"] == "0.6"
    assert second["top_k"] == "'=SUM(A1):0.6"  # a label that a spreadsheet would run is escaped


def test_rows_csv_leaves_the_columns_an_older_result_lacks_empty():
    row = row_of(explained(PROBABILITIES, {1: {str(DEPTH): grid_map((2, 3))}})).model_dump(mode="json")
    older = {key: value for key, value in row.items() if key not in {"top_k", "margin", "peak_ties"}}
    (line,) = csv.DictReader(io.StringIO(rows_csv({"rows": [older]})))
    assert (line["top_k"], line["margin"], line["peak_ties"]) == ("", "", "")
    assert line["confidence"] == "0.6"
