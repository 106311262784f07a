"""``perturb``: how identifiable the class stays at image tokens when attention or context is taken away.

docs/methods.md: self-only attention, no attention to prefix tokens (in the ``no_cls``
convention of the request, which ``data`` names), and a region of the token grid dropped
from the context.
"""

from __future__ import annotations

from typing import Any

from worker.analyses import figures
from worker.analyses.job import AnalysisError, AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.analyses.perturbation import NO_CLS_CONVENTIONS, default_region, perturbation_effects, region_keep


def check(job: AnalysisJob) -> None:
    """A region given must be a box of the model's token grid that leaves some token."""
    if job.request.region is None:
        return
    _, spec = open_vit(job.models[0], "perturb")
    try:
        region_keep(spec.grid, job.request.region)
    except ValueError as error:
        raise AnalysisError(str(error)) from error


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "perturb")
    job.steps.plan(len(job.spans))
    region = job.request.region or default_region(spec.grid)
    no_cls = job.request.no_cls
    effects = perturbation_effects(model, job.steps.over(job.labelled(loaded)), region, no_cls)
    curves = {name.replace("-", "_"): numbers(values, 4) for name, values in effects["curves"].items()}
    layers = ["embedding", *(f"block {b}" for b in range(1, spec.depth + 1))]
    targets = "true class" if job.labels is not None else "predicted class"
    data = {
        "model": model_name(loaded),
        "layers": layers,
        "targets": targets,
        "projection_convention": {"norm": "fresh", "bias": True},
        "no_cls": no_cls,
        "no_cls_convention": NO_CLS_CONVENTIONS[no_cls] if spec.num_prefix else "not run: no prefix token",
        "region": list(region),
        "region_default": job.request.region is None,
        "kept_tokens": effects["kept_tokens"],
        "image_tokens": spec.num_image_tokens,
        "identifiability": curves,
        "top1_hits": {name.replace("-", "_"): round(value, 4) for name, value in effects["hits"].items()},
    }
    return AnalysisOutcome(data, {"perturb": figure(data)})


_CURVE_NAMES = {
    "original": "unperturbed",
    "self_only": "self-only attention",
    "no_cls": "no attention to prefix tokens",
    "context_original": "unperturbed, kept tokens",
}


def figure(data: dict[str, Any]) -> bytes:
    names = {
        **_CURVE_NAMES,
        "no_cls": f"no attention to prefix tokens ({data['no_cls']})",
        "context": f"region {data['region']} dropped, kept tokens",
    }
    return figures.layer_curves(
        data["layers"],
        {names[name]: values for name, values in data["identifiability"].items()},
        title=f"{data['model']}: identifiability of the {data['targets']} at image tokens",
        ylabel="mean identifiability 1 - rank / C",
        limits=(0.0, 1.02),
        reference=(0.5, "about chance"),
    )
