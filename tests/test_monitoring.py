"""Unit tests of the monitoring signals, their counters and window in a store, and the population stability index."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

from classlens.core import monitoring
from classlens.core.contract import (
    ClassScore,
    Explanation,
    ModelRef,
    Signals,
    StreamStats,
    TargetExplanation,
)
from classlens.core.store import RedisStore, SqliteStore
from tests.audit_fixtures import audit_result

DEPTH = 2


def target(
    index: int, emergence: int | None, maps: dict[str, list[list[float]]], identifiability: float
) -> TargetExplanation:
    stats = StreamStats(
        prefix_ranks={"cls": [0] * (DEPTH + 1)},
        image_identifiability=[0.5, 0.6, identifiability],
        image_top1_share=[0.0] * 3,
    )
    return TargetExplanation(
        index=index,
        label=f"c{index}",
        probability=0.7,
        logit=1.0,
        rank=0,
        emergence_layer=emergence,
        pooled_ranks=[0] * (DEPTH + 1),
        residual=stats,
        projection_maps=maps,
    )


def explanation(targets: list[TargetExplanation], probabilities: tuple[float, ...] = (0.7, 0.2, 0.1)) -> Explanation:
    return Explanation(
        model=ModelRef(name="m", version="1", weights_sha256="0" * 64),
        norm="fresh",
        bias=True,
        map_kind="identifiability",
        grid=(2, 5),
        patch_size=(4, 4),
        prefix_tokens=["cls"],
        layers=DEPTH,
        pooling="token",
        prediction=[
            ClassScore(index=i + 3, label=f"c{i + 3}", probability=p, logit=0.0) for i, p in enumerate(probabilities)
        ],
        targets=targets,
    )


PEAKED = [[9.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]


def test_concentration_is_the_top_tenth_of_tokens_share_of_the_positive_mass():
    assert monitoring.concentration(PEAKED) == 0.9  # 10 tokens: the top one holds 9 of 10
    assert monitoring.concentration([[1.0] * 5] * 2) == 0.1  # uniform: exactly the top share
    assert monitoring.concentration([[-1.0, 2.0, 2.0]]) == 0.5  # negatives are no mass; ceil(0.3) = 1 token
    assert monitoring.concentration([[0.0, -1.0]]) is None


def test_signals_read_the_predicted_class_only():
    other = target(4, 0, {"2": [[1.0] * 5] * 2}, 0.99)
    predicted = target(3, 1, {"2": PEAKED, "0": [[1.0] * 5] * 2}, 0.8)
    found = monitoring.signals(explanation([other, predicted]))
    assert found == Signals(
        predicted_index=3,
        map_kind="identifiability",
        confidence=0.7,
        margin=0.5,
        explained=True,
        emergence_layer=1,
        identifiability=0.8,
        concentration=0.9,
    )


def test_signals_without_the_predicted_class_or_its_last_block_map():
    unexplained = monitoring.signals(explanation([target(4, 0, {"2": PEAKED}, 0.9)], (0.6,)))
    assert (unexplained.explained, unexplained.emergence_layer, unexplained.identifiability) == (False, None, None)
    assert unexplained.concentration is None
    assert unexplained.margin == 0.6  # a single class in the prediction: the top-1 itself
    earlier_layers_only = monitoring.signals(explanation([target(3, None, {"1": PEAKED}, 0.4)]))
    assert earlier_layers_only.explained
    assert earlier_layers_only.identifiability == 0.4
    assert earlier_layers_only.concentration is None  # no map of the last block: nothing else is guessed


def test_the_given_target_is_used_for_audit_rows():
    """Audits explain the predicted class in a second pass when needed: the row passes that target in."""
    found = monitoring.signals(explanation([]), target(3, 2, {"2": PEAKED}, 0.7))
    assert found.explained
    assert found.emergence_layer == 2
    assert found.concentration == 0.9


def test_psi_is_zero_for_equal_samples_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 500)
    assert monitoring.psi(reference, reference, 10) == pytest.approx(0.0, abs=1e-12)
    assert monitoring.psi(reference, rng.normal(0, 1, 500), 10) < 0.1
    assert monitoring.psi(reference, rng.normal(1.5, 1, 500), 10) > 0.25


def test_psi_of_counts_follows_its_formula_with_half_a_count_per_bin():
    reference, live = [10, 0], [5, 5]
    r = np.array([10.5, 0.5]) / 11
    lv = np.array([5.5, 5.5]) / 11
    assert monitoring.psi_of_counts(reference, live) == pytest.approx(float(np.sum((lv - r) * np.log(lv / r))))
    assert math.isfinite(monitoring.psi_of_counts([0, 7], [7, 0]))


def test_psi_bins_collapse_on_repeated_reference_values():
    """A saturated signal (every reference value the same) gets two bins, not ten empty ones."""
    same = [1.0] * 20
    assert monitoring.psi(same, same, 10) == pytest.approx(0.0)
    assert monitoring.psi(same, [0.5] * 20, 10) > 1.0


@pytest.fixture(params=["sqlite", "redis"])
def any_store(request, tmp_path):
    """Both back-ends (Redis: the session's real redis-server)."""
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "s.sqlite3")
    return RedisStore(request.getfixturevalue("redis_url"))


def test_record_counts_buckets_classes_and_keeps_a_bounded_window(any_store):
    store = any_store
    model = f"m-{uuid.uuid4().hex}@1"  # a model of this test's own in the shared redis-server
    found = monitoring.signals(explanation([target(3, 1, {"2": PEAKED}, 0.8)]))
    for _ in range(5):
        with store.writes() as writes:
            monitoring.record(writes, model, found, window=3, max_classes=10)
    wide = found.model_copy(update={"predicted_index": 12})
    with store.writes() as writes:  # a job's bookkeeping is sent with its other writes
        monitoring.record(writes, model, wide, window=3, max_classes=10)
    stats = monitoring.read_stats(store, model, DEPTH, 10, 20)
    buckets, total = stats.histograms["confidence"]
    assert dict(buckets)[0.7] == 6
    assert dict(buckets)[0.6] == 0
    assert dict(buckets)[math.inf] == 6
    assert total == pytest.approx(6 * 0.7)
    assert stats.classes == {"3": 5, monitoring.OTHER: 1}
    assert stats.emergence == {"1": 6}
    reference = monitoring.Reference(model, "a", DEPTH, 0.0, [found])
    monitoring.save_reference(store, reference)
    assert monitoring.load_reference(store, model) == reference  # kept untimed (a century)
    monitoring.delete_reference(store, model)
    assert monitoring.load_reference(store, model) is None
    window = monitoring.read_window(store, model, 3)
    assert len(window) == 3
    assert wide in window


def reference_of(items: list[Signals]) -> monitoring.Reference:
    return monitoring.Reference("m@1", "a", DEPTH, 0.0, items)


def test_drift_compares_every_signal_and_the_class_mix():
    base = Signals(
        predicted_index=1,
        map_kind="identifiability",
        confidence=0.9,
        margin=0.8,
        explained=True,
        emergence_layer=None,
        identifiability=0.9,
        concentration=0.3,
    )
    rng = np.random.default_rng(1)
    ref = [
        base.model_copy(update={"confidence": float(c), "predicted_index": i % 3})
        for i, c in enumerate(rng.uniform(0.5, 1, 60))
    ]
    same = monitoring.drift(reference_of(ref), ref, bins=10, max_classes=50)
    assert set(same) == set(monitoring.DRIFT_SIGNALS)
    assert max(same.values()) == pytest.approx(0.0, abs=1e-9)
    shifted = [item.model_copy(update={"confidence": item.confidence / 2, "predicted_index": 7}) for item in ref]
    moved = monitoring.drift(reference_of(ref), shifted, bins=10, max_classes=50)
    assert moved["confidence"] > 1
    assert moved["predicted_class"] > 1
    assert moved["margin"] == pytest.approx(0.0)
    # Maps of another kind are not compared: no concentration figure at all.
    logits = [item.model_copy(update={"map_kind": "logit"}) for item in ref]
    assert "concentration" not in monitoring.drift(reference_of(ref), logits, bins=10, max_classes=50)


def test_a_reference_is_made_from_audit_rows_with_signals():
    result = audit_result(ModelRef(name="m", version="1", weights_sha256="0" * 64), DEPTH, (1, 1), [None])
    row = result.rows[0]
    assert monitoring.reference_from_audit("m@1", "a", result) is None  # rows of older code carry no signals
    found = monitoring.signals(explanation([target(3, 1, {"2": PEAKED}, 0.8)]))
    with_signals = result.model_copy(update={"rows": [row.model_copy(update={"signals": found})]})
    reference = monitoring.reference_from_audit("m@1", "a", with_signals)
    assert reference is not None
    assert reference.signals == [found]
    assert reference.layers == DEPTH
