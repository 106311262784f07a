"""Monitoring: what each explanation says about its predicted class, and drift from a reference audit.

Three parts, all torch-free:

- :func:`signals` reads the figures monitoring follows out of one
  :class:`~classlens.core.contract.Explanation`. Workers call it for every explanation they
  finish, and audits for every row (``AuditRow.signals``), so live traffic and a reference audit
  are measured by the same definition.
- :func:`record` keeps them in the store as :mod:`classlens.core.stats` keeps its figures: a few
  integer counters (histogram buckets, predicted classes, emergence layers) that the API exports
  at scrape time, and a bounded window of the most recent explanations of each model version (a
  ring of ``drift_window`` slots, one step per explanation). Its writes go with the job's other
  bookkeeping (:meth:`~classlens.core.store.Store.writes`): no round trip of their own.
- A **reference** is a finished audit marked as the baseline of a model version; its rows' signals
  are copied into the store (:func:`save_reference`), so it outlives the audit's result. At scrape
  time :func:`drift` compares the window with it, signal by signal, by the population stability
  index (:func:`psi`).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from classlens.core import keys
from classlens.core.contract import AuditResult, ClassScore, Explanation, Signals, TargetExplanation
from classlens.core.store import Store, Writes

# Upper bounds of the histograms of signals that lie in [0, 1]; +Inf is implied.
SIGNAL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
HISTOGRAM_SIGNALS = ("confidence", "margin", "identifiability", "concentration")
# The signals compared with a reference, in the order of the drift gauges.
DRIFT_SIGNALS = ("confidence", "margin", "emergence_layer", "identifiability", "concentration", "predicted_class")
# Predicted classes at or beyond ``metrics_max_classes`` are counted under this label.
OTHER = "other"
NEVER = "never"
# The share of the tokens whose relevance counts as concentrated: the top 10 %.
TOP_SHARE = 0.1
# The store has no untimed value: a reference and the window's slots stay until replaced (or deleted).
FOREVER_S = 100 * 365 * 24 * 3600.0
_MICRO = 1_000_000


def concentration(values: Sequence[Sequence[float]]) -> float | None:
    """The share of a map's positive relevance mass held by its top 10 % of tokens.

    The mass is the map's positive part (negative values of a logit map say "against the
    class"); the top tokens are the ``ceil(0.1 * n)`` cells of largest value among the ``n``.
    A uniform map gives ``ceil(0.1 * n) / n``; one cell holding all the mass gives 1. None when the
    map has no positive mass.
    """
    mass = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0, None)
    total = float(mass.sum())
    if total <= 0:
        return None
    top = max(1, math.ceil(TOP_SHARE * mass.size))
    return round(float(np.sort(mass)[-top:].sum()) / total, 6)


def margin(prediction: Sequence[ClassScore]) -> float:
    """Top-1 minus top-2 probability: how far the decision is from the runner-up (the top-1 alone for one class)."""
    runner_up = prediction[1].probability if len(prediction) > 1 else 0.0
    return round(prediction[0].probability - runner_up, 6)


def signals(explanation: Explanation, target: TargetExplanation | None = None) -> Signals:
    """What monitoring reads of ``explanation``, about its predicted class only.

    - ``confidence``: the top-1 probability; ``margin``: top-1 minus top-2 probability (:func:`margin`).
    - From the predicted class's explanation (``target``, else the explanation's target of that
      class; when the class was not explained the three below are null and ``explained`` false):
      ``emergence_layer``; ``identifiability``, the mean identifiability ``1 - rank / C`` of the
      class over the image tokens of the last layer ``x_L`` (docs/methods.md, "Class rank and
      identifiability"); ``concentration`` of its last-block projection map (:func:`concentration`).
    - An explanation whose layers leave out the last block has no such map: its concentration is
      null and everything else is recorded.
    """
    top = explanation.prediction[0]
    if target is None:
        target = next((t for t in explanation.targets if t.index == top.index), None)
    chosen = target if target is not None and target.index == top.index else None
    values = None if chosen is None else chosen.projection_maps.get(str(explanation.layers))
    by_layer = [] if chosen is None else chosen.residual.image_identifiability  # x_0 .. x_L
    return Signals(
        predicted_index=top.index,
        map_kind=explanation.map_kind,
        confidence=round(top.probability, 6),
        margin=margin(explanation.prediction),
        explained=chosen is not None,
        emergence_layer=None if chosen is None else chosen.emergence_layer,
        identifiability=by_layer[explanation.layers] if len(by_layer) > explanation.layers else None,
        concentration=None if values is None else concentration(values),
    )


def class_slot(index: int, max_classes: int) -> str:
    """The counter a predicted class is counted in: its index below ``max_classes``, else :data:`OTHER`."""
    return str(index) if index < max_classes else OTHER


def _bucket_key(signal: str, model: str, bound: float) -> str:
    return f"{keys.STATS}signal:{signal}:{model}:{'inf' if math.isinf(bound) else f'{bound:g}'}"


def _sum_key(signal: str, model: str) -> str:
    return f"{keys.STATS}signal_sum:{signal}:{model}"


def _class_key(model: str, slot: str) -> str:
    return f"{keys.STATS}predicted:{model}:{slot}"


def _emergence_key(model: str, layer: int | None) -> str:
    return f"{keys.STATS}predicted_emergence:{model}:{NEVER if layer is None else layer}"


def _sequence_key(model: str) -> str:
    return f"{keys.STATS}window_sequence:{model}"


def _slots(model: str) -> str:
    """The window's slots of ``model`` are this and the slot's number."""
    return f"{keys.SIGNALS}{model}:"


def _slot_key(model: str, slot: int) -> str:
    return f"{_slots(model)}{slot}"


def reference_key(model: str) -> str:
    return f"{keys.REFERENCE}{model}"


def record(writes: Writes, model: str, found: Signals, *, window: int, max_classes: int) -> None:
    """Count ``found`` for ``model`` (name@version) and put it in the model's window of ``window`` slots.

    Each histogram keeps the count of its own bucket only (cumulated when read), so one value costs
    two writes whatever the buckets; the window is a ring (:meth:`~classlens.core.store.Writes.put_in_ring`),
    so it never holds more than ``window``.
    """
    for name in HISTOGRAM_SIGNALS:
        value = getattr(found, name)
        if value is None:
            continue
        bound = next((b for b in SIGNAL_BUCKETS if value <= b), math.inf)
        writes.incr(_bucket_key(name, model, bound))
        writes.incr(_sum_key(name, model), round(value * _MICRO))
    writes.incr(_class_key(model, class_slot(found.predicted_index, max_classes)))
    if found.explained:
        writes.incr(_emergence_key(model, found.emergence_layer))
    writes.put_in_ring(_sequence_key(model), _slots(model), window, found.model_dump_json().encode(), FOREVER_S)


def _count(store: Store, key: str) -> int:
    value = store.get(key)
    return int(value) if value else 0


@dataclass(frozen=True)
class SignalStats:
    """One model version's signal counters, read back for export."""

    histograms: dict[str, tuple[list[tuple[float, int]], float]]  # signal -> cumulative (bound, count), sum
    classes: dict[str, int]  # class index (or "other") -> count; only classes seen
    emergence: dict[str, int]  # "0".."L" or "never" -> count; only layers seen


def read_stats(store: Store, model: str, depth: int | None, max_classes: int, classes: int) -> SignalStats:
    """The counters of ``model``; ``depth`` bounds the emergence layers read (None: 0..64), ``classes`` the slots."""
    histograms: dict[str, tuple[list[tuple[float, int]], float]] = {}
    for name in HISTOGRAM_SIGNALS:
        running, cumulative = 0, []
        for bound in (*SIGNAL_BUCKETS, math.inf):
            running += _count(store, _bucket_key(name, model, bound))
            cumulative.append((bound, running))
        histograms[name] = (cumulative, _count(store, _sum_key(name, model)) / _MICRO)
    slots = [class_slot(index, max_classes) for index in range(min(classes, max_classes))]
    slots += [OTHER] if classes > max_classes else []
    counted = {slot: _count(store, _class_key(model, slot)) for slot in slots}
    layers: list[int | None] = [*range((depth if depth is not None else 64) + 1), None]
    emergence = {
        NEVER if layer is None else str(layer): _count(store, _emergence_key(model, layer)) for layer in layers
    }
    return SignalStats(
        histograms,
        {slot: n for slot, n in counted.items() if n},
        {layer: n for layer, n in emergence.items() if n},
    )


def read_window(store: Store, model: str, window: int) -> list[Signals]:
    """The signals of ``model``'s most recent explanations (at most ``window``), in no particular order."""
    found = (store.get(_slot_key(model, slot)) for slot in range(window))
    return [Signals.model_validate_json(data) for data in found if data is not None]


# --- References ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A model version's baseline: the audit it came from and its rows' signals."""

    model: str
    audit: str
    layers: int
    created_at: float
    signals: list[Signals]

    def body(self) -> dict[str, object]:
        """What ``GET .../reference`` answers: the audit, when, and how many rows it holds."""
        return {"model": self.model, "audit": self.audit, "images": len(self.signals), "created_at": self.created_at}


def reference_from_audit(model: str, audit: str, result: AuditResult) -> Reference | None:
    """The reference an audit result makes; None when its rows carry no signals (an audit of older code)."""
    found = [row.signals for row in result.rows if row.signals is not None]
    if not found:
        return None
    return Reference(model, audit, result.layers, time.time(), found)


def save_reference(store: Store, reference: Reference) -> None:
    data = {
        "model": reference.model,
        "audit": reference.audit,
        "layers": reference.layers,
        "created_at": reference.created_at,
        "signals": [item.model_dump(mode="json") for item in reference.signals],
    }
    store.set(reference_key(reference.model), json.dumps(data).encode(), FOREVER_S)


def load_reference(store: Store, model: str) -> Reference | None:
    data = store.get(reference_key(model))
    if data is None:
        return None
    fields = json.loads(data)
    items = [Signals.model_validate(item) for item in fields["signals"]]
    return Reference(fields["model"], fields["audit"], fields["layers"], fields["created_at"], items)


def delete_reference(store: Store, model: str) -> None:
    store.delete(reference_key(model))


# --- Drift ----------------------------------------------------------------------------------------------


def _shares(counts: Sequence[int]) -> np.ndarray:
    """Bin shares with half a count added to every bin, so that an empty bin has a small share, not 0."""
    values = np.asarray(counts, dtype=np.float64) + 0.5
    return values / values.sum()


def psi_of_counts(reference: Sequence[int], live: Sequence[int]) -> float:
    """The population stability index of two histograms over the same bins.

    ``PSI = sum_i (l_i - r_i) * ln(l_i / r_i)``, where ``r_i`` and ``l_i`` are the shares of bin
    ``i`` in the reference and in live traffic. A bin empty on one side would make the logarithm
    infinite, so each share is taken with half a count added to every bin (``(n_i + 0.5) /
    (n + 0.5 B)`` over ``B`` bins). 0 for equal shares; by the usual reading below 0.1 is stable,
    0.1 to 0.25 a moderate shift and above 0.25 a significant one.
    """
    expected, observed = _shares(reference), _shares(live)
    return float(np.sum((observed - expected) * np.log(observed / expected)))


def psi(reference: Sequence[float], live: Sequence[float], bins: int) -> float:
    """:func:`psi_of_counts` of two samples in bins cut at the reference's quantiles.

    The cuts are the reference's ``k / bins`` quantiles (``k = 1 .. bins - 1``), each kept once.
    Every cut is a bin of its own, between the open intervals around it: a signal with few distinct
    values (an emergence layer, a confidence saturated at 1) has its values in bins of their own, so
    a move from 1 to 0.9, or from layer 0 to layer 2, changes the shares, while a continuous one
    gets the ``bins`` intervals of the quantiles as usual.
    """
    cuts = np.unique(np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1]))

    def counts(values: Sequence[float]) -> list[int]:
        x = np.asarray(values, dtype=np.float64)
        where = np.searchsorted(cuts, x, side="left") + np.searchsorted(cuts, x, side="right")
        return np.bincount(where, minlength=2 * len(cuts) + 1).tolist()

    return psi_of_counts(counts(reference), counts(live))


def signal_values(items: Sequence[Signals], depth: int, map_kind: str | None = None) -> dict[str, list[float]]:
    """Each numeric signal's values over ``items``; a class that never emerged counts as layer ``depth + 1``.

    Nulls are left out (a class not explained, a map not computed); concentration is kept only for
    maps of ``map_kind`` (when given), since maps of other kinds are not comparable.
    """
    out: dict[str, list[float]] = {name: [] for name in DRIFT_SIGNALS if name != "predicted_class"}
    for item in items:
        for name in ("confidence", "margin", "identifiability"):
            value = getattr(item, name)
            if value is not None:
                out[name].append(value)
        if item.explained:
            out["emergence_layer"].append(depth + 1 if item.emergence_layer is None else item.emergence_layer)
        if item.concentration is not None and (map_kind is None or item.map_kind == map_kind):
            out["concentration"].append(item.concentration)
    return out


def drift(reference: Reference, live: Sequence[Signals], *, bins: int, max_classes: int) -> dict[str, float]:
    """The PSI of each signal between ``reference`` and ``live``; a signal without values on either side is left out.

    The predicted class is compared over the classes themselves (grouped as :func:`class_slot` does).
    The reference's concentration is read for its commonest map kind, and live traffic's for the same.
    """
    kinds = Counter(item.map_kind for item in reference.signals)
    kind = kinds.most_common(1)[0][0] if kinds else None
    ref = signal_values(reference.signals, reference.layers, kind)
    now = signal_values(live, reference.layers, kind)
    out = {name: round(psi(ref[name], now[name], bins), 6) for name in ref if ref[name] and now[name]}
    if reference.signals and live:
        ref_classes = Counter(class_slot(item.predicted_index, max_classes) for item in reference.signals)
        live_classes = Counter(class_slot(item.predicted_index, max_classes) for item in live)
        slots = sorted(set(ref_classes) | set(live_classes))
        out["predicted_class"] = round(
            psi_of_counts([ref_classes[s] for s in slots], [live_classes[s] for s in slots]), 6
        )
    return {name: out[name] for name in DRIFT_SIGNALS if name in out}
