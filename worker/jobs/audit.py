"""Audit jobs: explain many images batch by batch (progress after each), then build rows and aggregates."""

from __future__ import annotations

from classlens.core.contract import AuditResult, AuditRow, ExplainRequest, Job
from worker.audits import Explained, aggregate, audit_row, explain_batch, relevance_layer
from worker.jobs.inputs import decode_all, manifest
from worker.jobs.runtime import Runtime
from worker.jobs.single import run_single
from worker.lens.explain import ExplainError


def audit_job(rt: Runtime, job_id: str) -> Job | None:
    """Run one audit job to a terminal status; None when the job record is gone (expired)."""
    return run_single(
        rt, job_id, "audit", rt.settings.audit_soft_time_limit_s, lambda job: audit(rt, job).model_dump_json().encode()
    )


def audit(rt: Runtime, job: Job) -> AuditResult:
    """Explain the audit's images batch by batch (progress after each), then build rows and aggregates."""
    listed = manifest(rt, job, "audit")
    request = ExplainRequest.model_validate(job.parameters["explain"])
    model = rt.models.get(job.model, fingerprint=job.fingerprints.get(job.model))
    rows: list[AuditRow] = []
    first: Explained | None = None
    size = rt.settings.audit_batch_size
    for start in range(0, len(listed.images), size):
        batch = listed.images[start : start + size]
        images = decode_all(rt, batch, "audit")
        explained = explain_batch(model, images, [item.label for item in batch], request)
        first = first or explained[0]
        rows.extend(audit_row(item, found, request, model.labels) for item, found in zip(batch, explained, strict=True))
        job = rt.jobs.progress(job, len(rows))
    if first is None:
        raise ExplainError("the audit has no images")
    explanation = first.explanation
    layer = relevance_layer(explanation, next(iter(first.targets.values())))
    return AuditResult(
        model=explanation.model,
        layers=explanation.layers,
        grid=explanation.grid,
        map_kind=explanation.map_kind,
        relevance_layer=int(layer),
        rows=rows,
        aggregates=aggregate(rows, model.labels, explanation.layers, explanation.grid),
    )
