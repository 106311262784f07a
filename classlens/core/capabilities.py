"""What each kind of work needs of a model: one table that the API and the worker both read.

The API reads a model's manifest (torch-free) and refuses at submission what the manifest
already says cannot run, instead of answering 202 and letting the job fail in a worker; the
worker checks the same needs against the network it loaded. Two needs exist:

- ``vit``: a Vision Transformer the lens opens. The manifest records it as ``structure``
  (read from the built model when it was registered; ``null`` for a CNN kept for the
  representation analyses). Manifests written before ``structure`` existed are judged by
  what their architecture and arguments say (a patch grid: ``service.model_info``), so a
  ViT registered then is not refused.
- ``cls``: a CLS token, the first prefix token (``prefix_tokens`` starting with ``"cls"``:
  a model with register tokens only has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from classlens.core.contract import analysis_kinds

Need = Literal["vit", "cls"]

# Explanations and audits read the residual stream through the lens.
EXPLAIN_NEEDS: frozenset[Need] = frozenset({"vit"})
# Read from the analysis kinds' rules (classlens.core.contract.ANALYSIS_RULES):
# the kinds that open the blocks of a ViT,
VIT_KINDS: frozenset[str] = analysis_kinds(lambda rules: rules.vit)
# those that read ``representation``, and so need a CLS token when it is "cls",
REPRESENTATION_KINDS: frozenset[str] = analysis_kinds(lambda rules: rules.representation)
# and those whose representation need applies to the second model (compare_to) as well.
BOTH_MODELS_KINDS: frozenset[str] = analysis_kinds(lambda rules: rules.representation and rules.second_model != "never")

_WHY: dict[Need, str] = {
    "vit": "a Vision Transformer that the lens opens (the manifest's structure)",
    "cls": "a CLS token (the manifest's structure.prefix_tokens)",
}


def analysis_needs(kind: str, representation: str = "tokens") -> frozenset[Need]:
    """What the analysis ``kind`` needs of its (first) model, with ``representation`` as requested."""
    needs: set[Need] = set()
    if kind in VIT_KINDS:
        needs.add("vit")
    if kind in REPRESENTATION_KINDS and representation == "cls":
        needs.add("cls")
    return frozenset(needs)


def missing(needs: frozenset[Need], *, is_vit: bool, prefix_tokens: Sequence[str] = ()) -> list[Need]:
    """The needs a model does not meet, in a stable order (empty: it may run)."""
    met: dict[Need, bool] = {"vit": is_vit, "cls": is_vit and tuple(prefix_tokens[:1]) == ("cls",)}
    return [need for need in ("vit", "cls") if need in needs and not met[need]]


def describe_missing(what: str, reference: str, needs: Sequence[Need]) -> str:
    """A sentence for a client: which work, which model, and what it lacks."""
    lacking = " and ".join(_WHY[need] for need in needs)
    return f"{what} needs {lacking}; {reference} has none"
