"""``localization``: how far each final-layer token of a ViT still matches its input patch (token-localisation CKA)."""

from __future__ import annotations

from worker.analyses import figures
from worker.analyses.job import AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.analyses.layer_cka import localisation_cka


def check(job: AnalysisJob) -> None:
    """Nothing beyond the kind's rules (a ViT)."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "localization")
    job.steps.plan(len(job.spans))
    maps = localisation_cka(model, job.steps.over(job.batches(loaded)))
    data = {
        "model": model_name(loaded),
        "layer": f"block {spec.depth}",
        "grid": list(spec.grid),
        "patch_size": list(spec.patch_size),
        "examples": maps.examples,
        "maps": numbers(maps.maps, 4),
        "best_patch": maps.best_patches().tolist(),
        "own_position_share": round(maps.own_position_share(), 4),
        "mean_offset_px": round(maps.mean_offset(spec.patch_size), 4),
    }
    # Drawn from the maps at full precision (the data holds them rounded).
    title = f"{model_name(loaded)}: CKA of each final-layer token with every input patch ({maps.examples} images)"
    return AnalysisOutcome(data, {"localization": figures.localisation_grid(maps.maps.numpy(), spec.grid, title=title)})
