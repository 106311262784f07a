"""One entry point for every analysis: what the CLI (``classlens analyze``) and the worker task call.

The methods are those of docs/methods.md (CKA, attention distance, skip ratios,
token-localisation CKA, probes, model comparison) and section 1 (key-value memories,
attention and context perturbation, token probes, the gradient map by block and head, trained
against random weights); their maths lives in the modules of this package, and
each kind's runner in :mod:`worker.analyses.kinds`. This module is the registry: it checks
the request against the kind's row of :data:`~classlens.core.contract.ANALYSIS_RULES` (the
table the API checks at submission), then hands the job to the kind's runner.
docs/analyses.md gives the layout of ``data`` per kind and the figure names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from classlens.core.contract import (
    ANALYSIS_MIN_IMAGES,
    ANALYSIS_RULES,
    AnalysisRequest,
    AnalysisRules,
    analysis_kinds,
    layer_problem,
)
from worker.analyses.cka import CKAError
from worker.analyses.job import (
    AnalysisError,
    AnalysisJob,
    AnalysisOutcome,
    Progress,
    Steps,
    label_tensor,
    model_name,
    open_vit,
)
from worker.analyses.kinds import (
    attention_distance,
    cka,
    compare,
    gradient_parts,
    localization,
    memories,
    perturb,
    probes,
    residual,
    significance,
    skip_ratio,
    token_probes,
)
from worker.analyses.memories import MemoryLayoutError
from worker.analyses.representations import RepresentationError
from worker.lens.vit import UnsupportedModelError
from worker.model_loader import ModelLoadError
from worker.runtime import LoadedModel

__all__ = ["RUNNERS", "AnalysisError", "AnalysisOutcome", "Runner", "run_analysis"]


class Runner(Protocol):
    """The shape of every kind's module (see :mod:`worker.analyses.kinds`)."""

    def check(self, job: AnalysisJob) -> None: ...

    def run(self, job: AnalysisJob) -> AnalysisOutcome: ...


RUNNERS: Mapping[str, Runner] = {
    "cka": cka,
    "attention-distance": attention_distance,
    "skip-ratio": skip_ratio,
    "localization": localization,
    "probes": probes,
    "memories": memories,
    "perturb": perturb,
    "residual": residual,
    "compare": compare,
    "token-probes": token_probes,
    "gradient-parts": gradient_parts,
    "significance": significance,
}

_TAKES_REGION = analysis_kinds(lambda rules: rules.region)


def run_analysis(
    request: AnalysisRequest,
    models: Sequence[LoadedModel],
    images: Sequence[Image.Image],
    labels: np.ndarray | None,
    progress: Progress = lambda done, total: None,
) -> AnalysisOutcome:
    """Run ``request`` on ``models`` (one, or two for cka-across / compare) over ``images``."""
    job = AnalysisJob(request, list(models), list(images), label_tensor(labels, len(images)), Steps(progress))
    runner = RUNNERS[request.kind]
    try:
        check(job)
        runner.check(job)
        return runner.run(job)
    except (CKAError, RepresentationError, UnsupportedModelError, MemoryLayoutError, ModelLoadError) as error:
        raise AnalysisError(str(error)) from error


def check(job: AnalysisJob) -> None:
    """Refuse what the kind's row of the rules forbids, before any pass over the images."""
    request, count = job.request, len(job.images)
    rules = ANALYSIS_RULES[request.kind]
    if count < ANALYSIS_MIN_IMAGES:
        raise AnalysisError(f"{count} image(s): every analysis needs at least {ANALYSIS_MIN_IMAGES}")
    if not job.models:
        raise AnalysisError("no model given")
    if rules.second_model == "required" and not request.compare_to:
        raise AnalysisError(f"{request.kind} needs compare_to: the second model of the comparison")
    wanted = _models_wanted(rules, request, len(job.models))
    if len(job.models) != wanted:
        raise AnalysisError(f"{request.kind} takes {wanted} model(s), got {len(job.models)}")
    if rules.labels == "required" and job.labels is None:
        raise AnalysisError(
            f"{request.kind} need labels: give one class index per image (e.g. Fashion-MNIST test images)"
        )
    if job.labels is not None and rules.labels != "ignored":
        for loaded in job.models:
            classes = len(loaded.labels)
            if int(job.labels.min()) < 0 or int(job.labels.max()) >= classes:
                raise AnalysisError(f"labels must be class indices 0..{classes - 1} of {model_name(loaded)}")
    if rules.vit:  # the API refuses the same from manifests
        open_vit(job.models[0], request.kind)
    if request.region is not None and not rules.region:
        raise AnalysisError(f"region is a parameter of {' and '.join(sorted(_TAKES_REGION))} only")
    _check_layer(job, rules)


def _check_layer(job: AnalysisJob, rules: AnalysisRules) -> None:
    """``layer`` only for the kinds that take it, and within the model's layers (the rule the API applies)."""
    request = job.request
    if request.layer is None:
        return
    depth = open_vit(job.models[0], request.kind)[1].depth if rules.layer and rules.vit else None
    problem = layer_problem(request.kind, request.layer, depth)
    if problem is not None:
        raise AnalysisError(problem)


def _models_wanted(rules: AnalysisRules, request: AnalysisRequest, given: int) -> int:
    """How many models the request takes: two with a second model, required or named."""
    if rules.second_model == "required":
        return 2
    if rules.second_model == "optional" and (request.compare_to or given == 2):
        return 2  # given two without naming the second (the CLI may): compare across anyway
    return 1
