"""``memories``: the MLP value vectors of a ViT that promote a class, trained against a random-initialised copy.

docs/methods.md: key-value memories, scored against the class directions of the
class embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.analyses import figures
from worker.analyses.job import AnalysisError, AnalysisJob, AnalysisOutcome, model_name, numbers, open_vit
from worker.analyses.memories import (
    AGREEMENT_K,
    attention_value_scores,
    class_directions,
    key_value_agreement,
    memory_scores,
    memory_statistics,
    top_memories,
)
from worker.model_loader import create_architecture
from worker.runtime import LoadedModel

RANDOM_SEED = 0  # the random-initialised copy the trained model is compared with


def check(job: AnalysisJob) -> None:
    """A pre-norm ViT: a post-norm block normalises its MLP's output (``norm2``) before adding it.

    There the stream receives ``norm2(fc2(h))``, not a sum of ``fc2``'s columns weighted by
    the keys, so ``fc2``'s columns are not the value vectors that reach the residual stream.
    """
    _, spec = open_vit(job.models[0], "memories")
    if spec.post_norm:
        raise AnalysisError(
            f"memories reads fc2's columns as the value vectors added to the residual stream; "
            f"{model_name(job.models[0])} has post-norm blocks, which normalise the MLP output (norm2) before "
            "adding it, so its columns are not what the stream receives"
        )


def run(job: AnalysisJob) -> AnalysisOutcome:
    loaded = job.models[0]
    model, spec = open_vit(loaded, "memories")
    job.steps.plan(2 * len(job.spans))
    random_model = _random_copy(loaded)
    top = job.request.top_memories
    summary: dict[str, Any] = {}
    attention: dict[str, Any] = {}
    scores: torch.Tensor | None = None
    for name, network in (("trained", model), ("random", random_model)):
        directions = class_directions(network)
        mlp_scores = memory_scores(network, directions)
        scores = mlp_scores if name == "trained" else scores
        statistics = memory_statistics(mlp_scores, top)
        agreement = key_value_agreement(network, mlp_scores, job.steps.over(job.labelled(loaded)))
        summary[name] = {key: numbers(value, 4) for key, value in statistics.items()}
        summary[name]["key_value_agreement"] = numbers(agreement, 4)
        attention_statistics = memory_statistics(attention_value_scores(network, directions), top)
        attention[name] = {key: numbers(value, 4) for key, value in attention_statistics.items()}
    assert scores is not None
    hidden = scores.shape[-1]
    listed = top_memories(scores, top)
    data: dict[str, Any] = {
        "model": model_name(loaded),
        "convention": "P[c, k] = cos(E_g[c], v_k): E_g = head weight times the final norm's gain, rows centred; "
        "v_k = column k of fc2.weight; no bias",
        "top": top,
        "hidden_units": hidden,
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "classes_of": "labels" if job.labels is not None else "predictions",
        "random_seed": RANDOM_SEED,
        "agreement_chance": round(_agreement_chance(hidden), 4),
        "mlp": summary,
        "attention": attention,
        "top_memories": [
            {
                label: [{"unit": unit, "score": round(score, 4)} for unit, score in units]
                for label, units in zip(loaded.labels, block, strict=True)
            }
            for block in listed
        ],
    }
    return AnalysisOutcome(data, figures_of(data))


def _random_copy(loaded: LoadedModel) -> VisionTransformer:
    """A random-initialised model of the same architecture (seeded; the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = create_architecture(loaded.entry.manifest)
    model = model.eval().to(loaded.device)
    assert isinstance(model, VisionTransformer)
    return model


def _agreement_chance(hidden: int, k: int = AGREEMENT_K) -> float:
    """P(any of k units drawn at random is among k given ones), out of ``hidden``."""
    miss = 1.0
    for i in range(k):
        miss *= (hidden - k - i) / (hidden - i)
    return 1.0 - miss


def figures_of(data: dict[str, Any]) -> dict[str, bytes]:
    layers: list[str] = data["layers"]
    chance: float = data["agreement_chance"]
    trained, random = data["mlp"]["trained"], data["mlp"]["random"]
    top = data["top"]
    scores = figures.layer_curves(
        layers,
        {
            "top score, trained": trained["top_score"],
            "top score, random init": random["top_score"],
            "margin, trained": trained["margin"],
            "margin, random init": random["margin"],
        },
        title=f"{data['model']}: top-{top} MLP memories per class",
        ylabel="cosine with the class direction",
    )
    agreement = figures.layer_curves(
        layers,
        {
            "exclusive share, trained": trained["exclusive_share"],
            "exclusive share, random init": random["exclusive_share"],
            "key-value agreement, trained": trained["key_value_agreement"],
            "key-value agreement, random init": random["key_value_agreement"],
        },
        title=f"{data['model']}: memories that promote their class",
        ylabel="share",
        limits=(0.0, 1.02),
        reference=(chance, "agreement by chance"),
    )
    return {"memories": scores, "memories_agreement": agreement}
