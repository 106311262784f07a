"""Analysis jobs: load the model(s) and the images, run the analysis with progress, store its figures."""

from __future__ import annotations

import numpy as np

from classlens.core.contract import AnalysisRequest, AnalysisResult, Job
from worker.analyses.run import run_analysis
from worker.jobs.inputs import decode_all, manifest
from worker.jobs.runtime import Runtime
from worker.jobs.single import run_single


def analysis_job(rt: Runtime, job_id: str) -> Job | None:
    """Run one analysis job to a terminal status; None when the job record is gone (expired)."""
    return run_single(rt, job_id, "analysis", rt.settings.analysis_soft_time_limit_s, lambda job: analyse(rt, job))


def analyse(rt: Runtime, job: Job) -> bytes:
    """Load the model(s) and the images, run the analysis with progress, store its figures; the result JSON."""
    listed = manifest(rt, job, "analysis")
    request = AnalysisRequest.model_validate(job.parameters["analysis"])
    references = [job.model, *([request.compare_to] if request.compare_to else [])]
    # Any registered model (CKA compares a ViT with a CNN, say): run_analysis refuses what a kind cannot use.
    models = [
        rt.models.get(reference, require_vit=False, fingerprint=job.fingerprints.get(reference))
        for reference in references
    ]
    images = decode_all(rt, listed.images, "analysis")
    known = [item.label for item in listed.images]
    labels = np.array(known, dtype=np.int64) if known and None not in known else None
    current = job

    def report(done: int, total: int) -> None:
        nonlocal current
        if (done, total) != (current.progress.done, current.progress.total):
            current = rt.jobs.progress(current, done, total)

    outcome = run_analysis(request, models, images, labels, report)
    figures = {name: rt.jobs.put_figure(data) for name, data in outcome.figures.items()}
    result = AnalysisResult(
        kind=request.kind,
        models=[model.ref for model in models],
        images=len(images),
        data=outcome.data,
        figures=figures,
    )
    return result.model_dump_json().encode()
