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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from worker.lens.projection import ClassProjection, centred_embedding
from worker.lens.vit import attention_of, blocks_of, hooked, inspect_vit

AGREEMENT_K = 5


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


@contextmanager
def _pre_activations(model: VisionTransformer, sinks: list[list[torch.Tensor]], num_prefix: int) -> Iterator[None]:
    """Every block's top-5 keys at image tokens, ``[B, N, 5]``, appended to its sink as the pass goes."""

    def hook_for(sink: list[torch.Tensor]) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            sink.append(output[:, num_prefix:].topk(AGREEMENT_K, dim=-1).indices.cpu())

        return hook

    with ExitStack() as stack:
        for block, sink in zip(blocks_of(model), sinks, strict=True):
            fc1, _ = _mlp(block)
            stack.enter_context(hooked(fc1, hook_for(sink)))
        yield


def key_value_agreement(
    model: VisionTransformer, scores: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
) -> torch.Tensor:
    """``[L]``: share of image tokens whose top-5 keys include one of the top-5 values of the image's class.

    ``batches`` yields ``(images, classes)``; ``classes`` ``None`` means the model's prediction.
    """
    spec = inspect_vit(model)
    top_values = scores.topk(min(AGREEMENT_K, scores.shape[-1]), dim=-1).indices  # [L, C, k]
    totals = torch.zeros(spec.depth, dtype=torch.float64)
    images = 0
    for batch, classes in batches:
        sinks: list[list[torch.Tensor]] = [[] for _ in range(spec.depth)]
        with torch.no_grad(), _pre_activations(model, sinks, spec.num_prefix):
            logits = model(batch)
        targets = (logits.argmax(dim=-1) if classes is None else classes).cpu()
        for b, [keys] in enumerate(sinks):  # keys: [B, N, 5]
            values = top_values[b][targets]  # [B, 5]
            match = (keys[:, :, :, None] == values[:, None, None, :]).any(dim=-1).any(dim=-1)  # [B, N]
            totals[b] += match.double().mean(dim=1).sum()
        images += len(batch)
    if not images:
        raise ValueError("no images")
    return totals / images
