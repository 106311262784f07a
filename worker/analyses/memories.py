"""Key-value memories: which MLP value vectors promote which class (docs/methods.md, "Key-value memories").

In block ``b`` the MLP writes ``m = sum_k a_k v_k`` into the residual stream: hidden unit
``k``'s coefficient ``a_k`` (its *key*, the ``fc1`` pre-activation, through the activation)
times its *value* ``v_k``, column ``k`` of ``fc2.weight`` (row ``k`` of ``fc2.weight^T``).
Attention values are the columns of ``attn.proj.weight``.

Projection convention. A value vector matters by what it adds to the stream, so it is
read through the *linear part* of the projection ``z(v) = E F(v) + beta``: with the final
LayerNorm ``F(v) = g * (v - mean v) / s(v) + beta_F``, adding ``v`` moves the logits along
``E_g v`` with ``E_g = E diag(g)`` and each row centred (the norm removes the mean). Bias
terms do not depend on ``v`` and are left out, and the per-vector scale ``1 / s`` does not
change which class a vector promotes. Following docs/methods.md, rows of ``E_g`` and value
vectors are L2-normalised: ``P[c, k] = cos(E_g[c], v_k)``, in ``[-1, 1]``. For DeiT the main
head's ``E`` is used.

Statistics per block, over the ``top`` memories of each class (the units with the largest
``P[c, k]``), averaged over classes:

- ``top_score``: their mean ``P[c, k]``;
- ``margin``: their mean ``P[c, k] - max_{c' != c} P[c', k]`` (how exclusively they promote ``c``);
- ``exclusive_share``: the share of them whose highest class is ``c`` (``margin > 0``);

and, over images, ``key_value_agreement``: the share of image tokens for which any of the
5 most activated keys (largest ``fc1`` pre-activations) is among the 5 top values of the
image's class. The same statistics on a random-initialised model of the same architecture
say what chance looks like: for random weights ``P`` is about ``N(0, 1/D)``.

Attention has the same layout: ``attn.proj`` writes ``sum_k a_k u_k``, its input ``a`` (the
attention-weighted values, heads concatenated) times the columns ``u_k`` of
``attn.proj.weight``; the attention agreement reads its keys there, the 5 largest (signed)
coefficients, as the paper's code does.

Two agreement conventions (``AgreementConvention``). ``normalised`` (the default) takes a
class's top-5 values from ``P`` above and counts image tokens: the class directions then
follow the projection (final-norm gain, centred rows) and a value's length does not decide
its rank. ``reference`` follows the paper's code (``src/memories.py`` of
github.com/martinagvilas/vit-cls_emb): the top-5 values from the unnormalised
``head.weight @ fc2.weight`` (``@ attn.proj.weight`` for attention), counted over all tokens,
prefix tokens too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.projection import ClassProjection, centred_embedding
from worker.lens.vit import attention_of, blocks_of, hooked, inspect_vit

AGREEMENT_K = 5
AgreementConvention = Literal["normalised", "reference"]
Sublayer = Literal["mlp", "attention"]
# Which tokens each convention counts: image tokens, or every token (the reference's).
COUNTED_TOKENS: dict[AgreementConvention, Literal["image", "all"]] = {"normalised": "image", "reference": "all"}


class MemoryLayoutError(ValueError):
    """A model whose MLPs are not plain ``fc1 -> act -> fc2`` key-value memories."""


def class_directions(model: VisionTransformer) -> torch.Tensor:
    """``[C, D]`` float64: ``E diag(g)`` with centred rows, L2-normalised (see the module docstring)."""
    projection = ClassProjection(model)
    weight = centred_embedding(projection.readouts[0].head.weight.detach().double(), projection.final_norm)
    return F.normalize(weight.detach(), dim=-1)


def _mlp(block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    mlp = getattr(block, "mlp", None)
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear) or fc1.out_features != fc2.in_features:
        raise MemoryLayoutError(f"{type(mlp).__name__} is not an fc1 -> act -> fc2 MLP: its memories cannot be read")
    return fc1, fc2


def memory_scores(model: VisionTransformer, directions: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, C, H]``: ``P[c, k]`` of every MLP value vector of every block."""
    directions = class_directions(model) if directions is None else directions
    scores = []
    for block in blocks_of(model):
        _, fc2 = _mlp(block)
        values = F.normalize(fc2.weight.detach().double().T, dim=-1)  # [H, D]
        scores.append(directions.to(values.device) @ values.T)
    return torch.stack(scores).cpu()


def attention_value_scores(model: VisionTransformer, directions: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, C, D]``: the same for the attention output projection's columns (``attn.proj.weight``)."""
    directions = class_directions(model) if directions is None else directions
    scores = []
    for block in blocks_of(model):
        values = F.normalize(attention_of(block).proj.weight.detach().double().T, dim=-1)
        scores.append(directions.to(values.device) @ values.T)
    return torch.stack(scores).cpu()


def memory_statistics(scores: torch.Tensor, top: int) -> dict[str, torch.Tensor]:
    """``top_score``, ``margin``, ``exclusive_share`` per block (``[L]`` each) from ``[L, C, H]`` scores."""
    top = min(top, scores.shape[-1])
    values, units = scores.topk(top, dim=-1)  # [L, C, k]
    classes = scores.shape[1]
    # at_units[l, c', c, j] = P[c', units[l, c, j]]
    at_units = scores.gather(-1, units.reshape(scores.shape[0], 1, -1).expand(-1, classes, -1))
    at_units = at_units.reshape(scores.shape[0], classes, classes, top)
    own = torch.eye(classes, dtype=torch.bool)[None, :, :, None]
    best_other = at_units.masked_fill(own, -torch.inf).amax(dim=1)  # [L, C, k]
    margin = values - best_other
    return {
        "top_score": values.mean(dim=(1, 2)),
        "margin": margin.mean(dim=(1, 2)),
        "exclusive_share": (margin > 0).double().mean(dim=(1, 2)),
    }


def top_memories(scores: torch.Tensor, top: int) -> list[list[list[tuple[int, float]]]]:
    """Per block, per class: the ``top`` ``(unit, P)`` pairs, best first."""
    values, units = scores.topk(min(top, scores.shape[-1]), dim=-1)
    return [
        [list(zip(u.tolist(), v.tolist(), strict=True)) for u, v in zip(block_units, block_values, strict=True)]
        for block_units, block_values in zip(units, values, strict=True)
    ]


def reference_scores(model: VisionTransformer, sublayer: Sublayer) -> torch.Tensor:
    """``[L, C, K]`` float64: the reference's value scores, ``head.weight @ fc2.weight`` (or ``@ attn.proj.weight``).

    Nothing is normalised: no final-norm gain, no centring, no unit length (the ``reference`` convention).
    """
    head = ClassProjection(model).readouts[0].head.weight.detach().double()
    scores = []
    for block in blocks_of(model):
        values = _mlp(block)[1].weight if sublayer == "mlp" else attention_of(block).proj.weight
        scores.append(head @ values.detach().double().to(head.device))
    return torch.stack(scores).cpu()


def _keeper(sink: list[torch.Tensor], start: int) -> Callable[[torch.Tensor], None]:
    def keep(coefficients: torch.Tensor) -> None:
        sink.append(coefficients[:, start:].topk(AGREEMENT_K, dim=-1).indices.cpu())

    return keep


def _output_hook(keep: Callable[[torch.Tensor], None]) -> Callable[[nn.Module, Any, torch.Tensor], None]:
    return lambda module, inputs, output: keep(output)


def _input_hook(keep: Callable[[torch.Tensor], None]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    return lambda module, inputs: keep(inputs[0])


@contextmanager
def _top_keys(model: VisionTransformer, sinks: Mapping[str, list[list[torch.Tensor]]], start: int) -> Iterator[None]:
    """Every block's top-5 keys from token ``start`` on, ``[B, T - start, 5]``, appended to its sink as the pass goes.

    MLP keys are the ``fc1`` outputs (pre-activations), attention keys the input of ``attn.proj``.
    """
    with ExitStack() as stack:
        for b, block in enumerate(blocks_of(model)):
            if "mlp" in sinks:
                fc1, _ = _mlp(block)
                stack.enter_context(hooked(fc1, _output_hook(_keeper(sinks["mlp"][b], start))))
            if "attention" in sinks:
                proj = attention_of(block).proj
                stack.enter_context(hooked(proj, _input_hook(_keeper(sinks["attention"][b], start)), pre=True))
        yield


@dataclass
class ImageAgreement:
    """Per image and block, the share of counted tokens whose top-5 keys meet the top-5 values of its class."""

    shares: dict[str, torch.Tensor]  # sublayer -> [images, L] float64
    predictions: torch.Tensor  # [images]: the model's top-1
    labels: torch.Tensor | None  # [images], when given

    @property
    def correct(self) -> torch.Tensor | None:
        """``[images]`` bool: the prediction equals the label (``None`` without labels)."""
        return None if self.labels is None else self.predictions == self.labels


def image_agreement(
    model: VisionTransformer,
    scores: Mapping[str, torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    tokens: Literal["image", "all"] = "image",
) -> ImageAgreement:
    """Key-value agreement per image, for each sublayer of ``scores`` (``"mlp"``, ``"attention"``: ``[L, C, K]``).

    A class's values are its top-5 of ``scores``; a token agrees when any of its top-5 keys is
    one of them. ``batches`` yields ``(images, classes)``; ``classes`` ``None`` means the
    model's prediction. ``tokens``: count the image tokens, or all tokens (prefix too).
    """
    spec = inspect_vit(model)
    start = spec.num_prefix if tokens == "image" else 0
    top_values = {name: s.topk(min(AGREEMENT_K, s.shape[-1]), dim=-1).indices for name, s in scores.items()}
    shares: dict[str, list[torch.Tensor]] = {name: [] for name in scores}
    predictions, labels = [], []
    for batch, classes in batches:
        sinks: dict[str, list[list[torch.Tensor]]] = {name: [[] for _ in range(spec.depth)] for name in scores}
        with torch.no_grad(), _top_keys(model, sinks, start):
            predicted = model(batch).argmax(dim=-1).cpu()
        targets = predicted if classes is None else classes.cpu()
        for name, blocks in sinks.items():
            per_block = []
            for b, [keys] in enumerate(blocks):  # keys: [B, T', 5]
                values = top_values[name][b][targets]  # [B, 5]
                match = (keys[:, :, :, None] == values[:, None, None, :]).any(dim=-1).any(dim=-1)  # [B, T']
                per_block.append(match.double().mean(dim=1))
            shares[name].append(torch.stack(per_block, dim=1))
        predictions.append(predicted)
        if classes is not None:
            labels.append(classes.cpu())
    if not predictions:
        raise ValueError("no images")
    return ImageAgreement(
        {name: torch.cat(parts) for name, parts in shares.items()},
        torch.cat(predictions),
        torch.cat(labels) if len(labels) == len(predictions) else None,
    )


def key_value_agreement(
    model: VisionTransformer, scores: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
) -> torch.Tensor:
    """``[L]``: share of image tokens whose top-5 keys include one of the top-5 values of the image's class.

    ``batches`` yields ``(images, classes)``; ``classes`` ``None`` means the model's prediction.
    """
    return image_agreement(model, {"mlp": scores}, batches).shares["mlp"].mean(dim=0)
