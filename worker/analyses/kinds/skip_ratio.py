"""``skip-ratio``: how much each block passes its input on, ||z|| / ||f(z)||, for a ViT or a ResNet-family CNN."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

from worker.analyses import figures
from worker.analyses.job import AnalysisError, AnalysisJob, AnalysisOutcome, is_lens_vit, model_name, numbers, open_vit
from worker.analyses.skip_ratio import cnn_skip_ratios, residual_blocks, skip_ratios
from worker.runtime import LoadedModel


def check(job: AnalysisJob) -> None:
    """Nothing up front: a model without residual blocks is refused when its part is computed."""


def run(job: AnalysisJob) -> AnalysisOutcome:
    job.steps.plan(len(job.spans))
    data = part(job, job.models[0])
    return AnalysisOutcome(data, {"skip_ratio": figure(data)})


def supported(loaded: LoadedModel) -> bool:
    """Whether ``loaded`` has skip ratios to measure: a ViT the lens opens, or a CNN with residual blocks."""
    if isinstance(loaded.network, VisionTransformer):
        return is_lens_vit(loaded)
    return bool(residual_blocks(loaded.network))


def part(job: AnalysisJob, loaded: LoadedModel) -> dict[str, Any]:
    """The ratios of ``loaded``'s blocks, as JSON-ready numbers."""
    network = loaded.network
    batches = job.steps.over(job.batches(loaded))
    if isinstance(network, VisionTransformer):
        open_vit(loaded, "skip-ratio")
        ratios = skip_ratios(network, batches)
        return {
            "model": model_name(loaded),
            "architecture": "vit",
            "aggregation": "mean over images of the per-token ratio ||z|| / ||f(z)||; image tokens: also over tokens",
            "layers": [f"block {b}" for b in range(1, len(ratios["mlp_image"]) + 1)],
            **{key: numbers(value, 4) for key, value in ratios.items()},
        }
    if not residual_blocks(network):
        raise AnalysisError(
            f"skip-ratio needs a ViT or a ResNet-family CNN: {model_name(loaded)} has no residual blocks"
        )
    result = cnn_skip_ratios(network, batches)
    return {
        "model": model_name(loaded),
        "architecture": "cnn",
        "aggregation": "mean over images of the mean over positions of ||shortcut(z)|| / ||f(z)||",
        "layers": result["blocks"],
        "block_image": numbers(result["block_image"], 4),
    }


def figure(data: dict[str, Any]) -> bytes:
    if data["architecture"] == "vit":
        curves = {
            "attention, CLS": data["attention_cls"],
            "attention, image tokens": data["attention_image"],
            "MLP, CLS": data["mlp_cls"],
            "MLP, image tokens": data["mlp_image"],
        }
        curves = {name: values for name, values in curves.items() if any(v is not None for v in values)}
    else:
        curves = {"residual branch, all positions": data["block_image"]}
    return figures.layer_curves(
        data["layers"], curves, title=f"{data['model']}: skip-connection ratio", ylabel="||z|| / ||f(z)||"
    )
