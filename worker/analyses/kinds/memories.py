"""``memories``: the MLP value vectors of a ViT that promote a class, trained against a random-initialised copy.

docs/methods.md: key-value memories, scored against the class directions of the
class embedding. ``agreement`` chooses the key-value agreement convention
(:data:`worker.analyses.memories.AgreementConvention`); ``data`` names it.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from worker.analyses import figures
from worker.analyses.job import (
    RANDOM_COPY_SEED,
    AnalysisError,
    AnalysisJob,
    AnalysisOutcome,
    model_name,
    numbers,
    open_vit,
    random_copy,
)
from worker.analyses.memories import (
    AGREEMENT_K,
    COUNTED_TOKENS,
    AgreementConvention,
    ImageAgreement,
    attention_value_scores,
    class_directions,
    image_agreement,
    memory_scores,
    memory_statistics,
    reference_scores,
    top_memories,
)

AGREEMENT_CONVENTIONS: dict[AgreementConvention, str] = {
    "normalised": "a class's values: its top-5 units by P[c, k] (the convention above; for attention the columns of "
    "attn.proj.weight); counted over image tokens",
    "reference": "a class's values: its top-5 units by the unnormalised head.weight @ fc2.weight "
    "(head.weight @ attn.proj.weight for attention), as the paper's code; counted over all tokens, prefix tokens too",
}
KEYS = {
    "mlp": "the 5 largest fc1 outputs (pre-activations) at a token",
    "attention": "the 5 largest (signed) coefficients of the input of attn.proj at a token (attention-weighted "
    "values, heads concatenated), as the paper's code",
}


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
    random_model = random_copy(loaded)
    top = job.request.top_memories
    convention = job.request.agreement
    summary: dict[str, Any] = {}
    attention: dict[str, Any] = {}
    scores: torch.Tensor | None = None
    attention_units = 0
    by_correctness: dict[str, Any] | None = None
    for name, network in (("trained", model), ("random", random_model)):
        directions = class_directions(network)
        mlp_scores = memory_scores(network, directions)
        attention_scores = attention_value_scores(network, directions)
        scores = mlp_scores if name == "trained" else scores
        attention_units = attention_scores.shape[-1]
        agreement = image_agreement(
            network,
            _agreement_scores(network, convention, mlp_scores, attention_scores),
            job.steps.over(job.labelled(loaded)),
            COUNTED_TOKENS[convention],
        )
        summary[name] = {key: numbers(value, 4) for key, value in memory_statistics(mlp_scores, top).items()}
        summary[name]["key_value_agreement"] = numbers(agreement.shares["mlp"].mean(dim=0), 4)
        attention[name] = {key: numbers(value, 4) for key, value in memory_statistics(attention_scores, top).items()}
        attention[name]["key_value_agreement"] = numbers(agreement.shares["attention"].mean(dim=0), 4)
        if name == "trained":
            by_correctness = _by_correctness(agreement)
    assert scores is not None
    hidden = scores.shape[-1]
    listed = top_memories(scores, top)
    data: dict[str, Any] = {
        "model": model_name(loaded),
        "convention": "P[c, k] = cos(E_g[c], v_k): E_g = head weight times the final norm's gain, rows centred; "
        "v_k = column k of fc2.weight; no bias",
        "agreement": convention,
        "agreement_convention": AGREEMENT_CONVENTIONS[convention],
        "agreement_keys": KEYS,
        "agreement_tokens": COUNTED_TOKENS[convention],
        "top": top,
        "hidden_units": hidden,
        "layers": [f"block {b}" for b in range(1, spec.depth + 1)],
        "classes_of": "labels" if job.labels is not None else "predictions",
        "random_seed": RANDOM_COPY_SEED,
        "agreement_chance": round(_agreement_chance(hidden), 4),
        "attention_agreement_chance": round(_agreement_chance(attention_units), 4),
        "mlp": summary,
        "attention": attention,
        "by_correctness": by_correctness,
        "top_memories": [
            {
                label: [{"unit": unit, "score": round(score, 4)} for unit, score in units]
                for label, units in zip(loaded.labels, block, strict=True)
            }
            for block in listed
        ],
    }
    return AnalysisOutcome(data, figures_of(data))


def _agreement_scores(
    network: VisionTransformer, convention: AgreementConvention, mlp: torch.Tensor, attention: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The scores whose per-class top-5 are a class's values, for each sublayer, in ``convention``."""
    if convention == "reference":
        return {"mlp": reference_scores(network, "mlp"), "attention": reference_scores(network, "attention")}
    return {"mlp": mlp, "attention": attention}


def _by_correctness(agreement: ImageAgreement) -> dict[str, Any] | None:
    """Mean agreement per block over the correctly and the wrongly classified images (``None`` without labels)."""
    correct = agreement.correct
    if correct is None:
        return None
    groups = {}
    for group, members in (("correct", correct), ("misclassified", ~correct)):
        count = int(members.sum())
        groups[group] = {"images": count} | {
            name: numbers(shares[members].mean(dim=0), 4) if count else None
            for name, shares in agreement.shares.items()
        }
    return groups


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
        title=f"{data['model']}: memories that promote their class ({data['agreement']} agreement)",
        ylabel="share",
        limits=(0.0, 1.02),
        reference=(chance, "agreement by chance"),
    )
    attention = figures.layer_curves(
        layers,
        {
            "attention key-value agreement, trained": data["attention"]["trained"]["key_value_agreement"],
            "attention key-value agreement, random init": data["attention"]["random"]["key_value_agreement"],
        },
        title=f"{data['model']}: attention key-value agreement ({data['agreement']})",
        ylabel=f"share of {data['agreement_tokens']} tokens",
        limits=(0.0, 1.02),
        reference=(data["attention_agreement_chance"], "agreement by chance"),
    )
    drawn = {"memories": scores, "memories_agreement": agreement, "memories_attention": attention}
    if data["by_correctness"] is not None:
        drawn["memories_correctness"] = correctness_figure(data)
    return drawn


def correctness_figure(data: dict[str, Any]) -> bytes:
    """Key-value agreement of the trained model over correctly and wrongly classified images."""
    curves = {}
    for group, values in data["by_correctness"].items():
        for sublayer in ("mlp", "attention"):
            if values[sublayer] is not None:
                curves[f"{sublayer}, {group} ({values['images']} images)"] = values[sublayer]
    return figures.layer_curves(
        data["layers"],
        curves,
        title=f"{data['model']}: key-value agreement by correctness ({data['agreement']})",
        ylabel=f"share of {data['agreement_tokens']} tokens",
        limits=(0.0, 1.02),
    )
