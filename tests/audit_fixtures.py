"""A minimal audit result built by hand, for tests of what reads audits (references, drift)."""

from __future__ import annotations

from classlens.core.contract import AuditAggregates, AuditResult, AuditRow, ModelRef, Signals


def audit_result(
    model: ModelRef, layers: int, grid: tuple[int, int], signals: list[Signals | None], label: str = "c1"
) -> AuditResult:
    """One row per entry of ``signals`` (None: a row of older code, without signals), class 1 predicted."""
    rows = [
        AuditRow(
            file=f"{i}.png",
            true_index=None,
            true_label=None,
            predicted_index=1,
            predicted_label=label,
            probability=0.5,
            confidence=0.5,
            margin=0.1,
            entropy=1.0,
            top_k=[],
            correct=None,
            predicted_emergence_layer=1,
            true_emergence_layer=None,
            explained_index=1,
            explained_label=label,
            peak_row=0,
            map_kind="identifiability",
            peak_col=0,
            peak_ties=1,
            central_share=None,
            border_share=None,
            region_shares=None,
            relevance_by_layer={},
            map=[[0.0]],
            signals=found,
        )
        for i, found in enumerate(signals)
    ]
    aggregates = AuditAggregates(
        images=len(rows),
        labelled=0,
        correct=0,
        accuracy=None,
        confusion=[],
        mean_emergence_by_class=[],
        emergence_histogram={},
        mean_top1_probability=0.5,
        mean_margin=None,
        mean_entropy=None,
        mean_central_share=None,
        central_cells_share=0.2,
    )
    return AuditResult(
        model=model,
        layers=layers,
        grid=grid,
        map_kind="identifiability",
        relevance_layer=layers,
        rows=rows,
        aggregates=aggregates,
    )
