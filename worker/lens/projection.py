"""Class-embedding projection (docs/methods.md, "Projection"; Vilas et al., NeurIPS 2023).

``z(v) = E F(v) + beta``: the classifier's class embeddings ``E = head.weight``
applied to any ``D``-vector after the model's final norm ``F`` (whichever norm the
model applies: ``model.norm`` for CLS-pooled models, ``model.fc_norm`` for most GAP
models; see :mod:`worker.lens.vit`). The model is opened through its family's
adapter (:mod:`worker.lens.families`), so this module is the same for every family.
Two documented choices, always reported with the result:

- ``norm="fresh"`` (default, the paper's): ``F`` recomputes mean and variance
  from ``v`` itself. ``norm="cached"`` (the ViT-Prisma convention): ``v`` is
  centred on its own mean but divided by the scale the final norm applied to the
  last layer's vector at the same token position.
- ``bias=False`` drops the head bias ``beta``.

:meth:`ClassProjection.pooled` reads a layer out the way the model reads its last
layer (CLS token, GAP of image tokens, or DeiT's average of the CLS and
distillation heads; the norm before or after pooling, where the model has it), so
that at the last layer it equals the model's logits.

:meth:`ClassProjection.streams` projects every token of every stream at once, and
does a third less arithmetic than projecting each stream on its own. With a
LayerNorm ``F(v) = g * (v - mean v) / s(v) + beta_F``, so

    z(v) = (E_c v) / s(v) + (E beta_F + beta),   E_c = E diag(g) with each row centred,

where ``E_c v`` is *linear* in ``v``: the residual stream's ``E_c x_b`` is the
running sum of ``E_c x_0`` and the sublayers' ``E_c a_j + E_c m_j``, so only
``x_0`` and the sublayers go through the matrix product. (The converse, deriving
``E_c m_b`` by subtraction, cancels catastrophically; this direction only adds.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Literal, Self, cast

import torch
import torch.nn.functional as F
from torch import nn

from worker.lens import finishing
from worker.lens.adapter import LensModel, Readout, Trace, UnsupportedModelError
from worker.lens.families import open_model
from worker.lens.ranks import class_rank
from worker.lens.workspace import Workspace

NormMode = Literal["fresh", "cached"]


@dataclass(frozen=True)
class ProjectionSettings:
    norm: NormMode = "fresh"
    bias: bool = True


@dataclass(frozen=True)
class Streams:
    """One tensor per kind of stream, each ``[B, S_kind, ...]``: the residual stream and, when traced, the sublayers.

    Three tensors rather than one ``[B, S, ...]``: an ONNX explainer graph returns them as
    its products leave the matrix multiplications, and joining them would copy all of them.
    Torch's own pass returns views of one buffer (:meth:`split`).
    """

    residual: torch.Tensor  # [B, L + 1, ...]: x_0 .. x_L
    attention: torch.Tensor | None = None  # [B, L, ...]: a_1 .. a_L
    mlp: torch.Tensor | None = None  # [B, L, ...]: m_1 .. m_L
    # [B, S, ...]: the tensor the parts are views of, when they came from one (:meth:`split`).
    whole: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def parts(self) -> list[torch.Tensor]:
        """The tensors in the streams' order (``x``, then ``a``, then ``m``), the sublayers when present."""
        return [part for part in (self.residual, self.attention, self.mlp) if part is not None]

    @classmethod
    def split(cls, whole: torch.Tensor, depth: int) -> Self:
        """Views of a tensor whose dimension 1 runs over the streams (``[B, S, ...]``), one per kind of stream."""
        if whole.shape[1] == depth + 1:
            return cls(whole, whole=whole)
        return cls(whole[:, : depth + 1], whole[:, depth + 1 : 2 * depth + 1], whole[:, 2 * depth + 1 :], whole=whole)


@dataclass(frozen=True)
class CentredStreams(Streams):
    """``E_c v`` ``[B, S_kind, T, C]`` at every token of each kind of stream: the settings-free half of the projection.

    What :meth:`ClassProjection.centred` and an ONNX explainer graph compute;
    :meth:`ClassProjection.of_trace` turns it into :class:`StreamLogits` (:meth:`ClassProjection.finish`).
    """


@dataclass(frozen=True)
class StreamLogits(Streams):
    """The logits ``[B, S_kind, T, C]`` at every token of each kind of stream, under a projection's settings."""

    # [B, K, S, T]: the ranks of the targets they were finished with (ClassProjection.of_trace), when given.
    target_ranks: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def ranks(self, targets: torch.Tensor) -> torch.Tensor:
        """The ranks of ``targets`` ``[B, K]`` at every stream and token: ``[B, K, S, T]`` (:func:`class_rank`).

        Counted over the streams in one call when they are one tensor; each rank is a count, so the same.
        """
        if self.whole is not None:
            return class_rank(self.whole, targets)
        return torch.cat([class_rank(part, targets) for part in self.parts()], dim=2)


class ClassProjection:
    """Project hidden states of one ViT onto its class embeddings."""

    def __init__(self, model: nn.Module | LensModel, settings: ProjectionSettings = ProjectionSettings()):
        self.lens = open_model(model)
        self.spec = self.lens.spec
        self.settings = settings
        self.final_norm: nn.Module = self.lens.final_norm
        if settings.norm == "cached" and not isinstance(self.final_norm, nn.LayerNorm):
            raise UnsupportedModelError(
                f"the cached-scale projection needs a LayerNorm as final norm; this model's is "
                f"{type(self.final_norm).__name__}: use norm 'fresh'"
            )
        # The model's own read-out of its last layer: heads, their pooling, where the norm runs.
        self.readouts: tuple[Readout, ...] = self.lens.readouts
        self.norm_before_pool = self.lens.norm_before_pool

    def normalise(self, v: torch.Tensor, scale_from: torch.Tensor | None = None) -> torch.Tensor:
        """``F(v)``; with the cached convention, the scale comes from ``scale_from`` (same shape, or broadcastable)."""
        if self.settings.norm == "fresh":
            return self.final_norm(v)
        if scale_from is None:
            raise ValueError("the cached-scale projection needs the last layer's vectors")
        norm = self.final_norm
        assert isinstance(norm, nn.LayerNorm)
        scale = _scale(scale_from, norm.eps).unsqueeze(-1)
        centred = v - v.mean(dim=-1, keepdim=True)
        return centred / scale * norm.weight + norm.bias

    def _linear(self, head: nn.Linear, normalised: torch.Tensor) -> torch.Tensor:
        bias = head.bias if self.settings.bias else None
        return F.linear(normalised, head.weight, bias)

    def __call__(self, v: torch.Tensor, scale_from: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[..., C]`` of every ``D``-vector in ``v`` under the class embedding of the main head."""
        return self._linear(self.readouts[0].head, self.normalise(v, scale_from))

    def streams(
        self,
        residual: torch.Tensor,
        attention: torch.Tensor | None = None,
        mlp: torch.Tensor | None = None,
        workspace: Workspace | None = None,
        whole: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every token of every stream, ``[B, S, T, C]``.

        ``residual`` ``[B, L + 1, T, D]`` (``x_0 .. x_L``); with ``attention`` and ``mlp``
        (``[B, L, T, D]`` each) the streams are ``x_0 .. x_L, a_1 .. a_L, m_1 .. m_L``.
        Equal to calling the projection on each stream (within float32 rounding). With a
        ``workspace`` the logits are written into its buffer; ``whole`` is the three streams in one
        tensor, when the caller has them so (:meth:`centred`).
        """
        last = residual[:, -1:]  # the cached-scale reference, for every stream
        if attention is None or mlp is None:
            return self(residual, last)
        if not isinstance(self.final_norm, nn.LayerNorm):  # no closed form: project each stream
            return self(torch.cat([residual, attention, mlp], dim=1), last)
        centred, scales = self.centred(residual, attention, mlp, workspace, whole)
        return self.finish(centred, scales, scales[:, self.spec.depth : self.spec.depth + 1])

    def of_trace(
        self,
        run: Trace,
        sublayers: bool = True,
        workspace: Workspace | None = None,
        targets: torch.Tensor | None = None,
    ) -> StreamLogits:
        """The stream logits of a trace; finished from the graph's centred products when it has them.

        Those products are finished in place (:meth:`finish`), so the trace gives them up: its
        ``centred`` is None afterwards, and its memory is the returned logits'. Finishing one
        trace twice is an error rather than an answer computed from logits taken for ``E_c v``.
        With ``targets`` ``[B, K]`` the result carries their ranks (``target_ranks``); on the CPU
        they are counted in the same pass that finishes the logits (:mod:`worker.lens.finishing`).
        """
        depth = self.spec.depth
        if run.centred is None:
            if run.scales is not None:
                raise ValueError("this trace's E_c v products were already finished into logits (of_trace)")
            if (
                targets is not None
                and sublayers
                and run.attention is not None
                and run.mlp is not None
                and self._finished_compiled(run.residual)
            ):
                products, own_scales = self.centred(
                    run.residual, run.attention, run.mlp, workspace, run.streams, running_sums=False
                )
                divisors = self._divisors(own_scales, own_scales[:, depth : depth + 1])
                ranks = finishing.finish_and_rank(products, divisors, self.offset, targets, depth)
                return replace(StreamLogits.split(products, depth), target_ranks=ranks)
            attention, mlp = (run.attention, run.mlp) if sublayers else (None, None)
            whole = run.streams if sublayers else None
            logits = StreamLogits.split(self.streams(run.residual, attention, mlp, workspace, whole), depth)
            return logits if targets is None else replace(logits, target_ranks=logits.ranks(targets))
        if run.scales is None:
            raise ValueError("a trace with E_c v products needs their scales s(v)")
        centred, run.centred = run.centred, None
        last = run.scales[:, depth : depth + 1]
        parts = centred.parts() if sublayers else [centred.residual]
        scales = Streams.split(run.scales, depth).parts()[: len(parts)]
        if targets is not None and all(finishing.fits(part) for part in parts):
            counted = [
                finishing.finish_and_rank(part, self._divisors(own, last), self.offset, targets)
                for part, own in zip(parts, scales, strict=True)
            ]
            return replace(StreamLogits(*parts), target_ranks=torch.cat(counted, dim=2))
        logits = StreamLogits(*(self.finish(part, own, last) for part, own in zip(parts, scales, strict=True)))
        return logits if targets is None else replace(logits, target_ranks=logits.ranks(targets))

    def _finished_compiled(self, residual: torch.Tensor) -> bool:
        """Whether the streams take the closed form (a LayerNorm) and the compiled last pass (:mod:`.finishing`)."""
        return isinstance(self.final_norm, nn.LayerNorm) and finishing.fits(residual)

    def _divisors(self, scales: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Each row's divisor ``[B, S', T]``: its own scale ``scales``, or ``x_L``'s ``last`` (cached)."""
        return scales if self.settings.norm == "fresh" else last.expand_as(scales)

    def centred(
        self,
        residual: torch.Tensor,
        attention: torch.Tensor,
        mlp: torch.Tensor,
        workspace: Workspace | None = None,
        whole: torch.Tensor | None = None,
        *,
        running_sums: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The settings-free half of :meth:`streams`: ``E_c v`` ``[B, S, T, C]`` and ``s(v)`` ``[B, S, T]``.

        What an ONNX explainer graph computes (:func:`centred_stream_logits`); this is
        the same arithmetic for torch, written into preallocated memory: the workspace's
        ``"logits"`` buffer when there is one. ``whole`` (``[B, S, T, D]``, the streams of which
        the others are views) lets the scales be one reduction rather than three and a copy.
        Without ``running_sums`` the residual rows ``1 .. L`` are left unwritten, for the pass that
        builds them while it finishes every row (:func:`worker.lens.finishing.finish_and_rank`).
        """
        batch, depth, tokens, _ = attention.shape
        weight = self.centred_embedding
        shape = (batch, 1 + 3 * depth, tokens, weight.shape[0])
        if workspace is None:
            out = residual.new_empty(shape)
        else:
            out = workspace.empty("logits", shape, residual.dtype, residual.device)
        classes = weight.shape[0]

        def product(streams: torch.Tensor, into: torch.Tensor) -> None:
            # 2-D products into contiguous slices: measured 10 % faster than batched matmul with out=.
            torch.mm(streams.reshape(-1, streams.shape[-1]), weight.T, out=into.view(-1, classes))

        for b in range(batch):  # per image, so that every product writes a contiguous slice
            product(residual[b, 0], out[b, 0])
            if whole is None:
                product(attention[b], out[b, 1 + depth : 1 + 2 * depth])
                product(mlp[b], out[b, 1 + 2 * depth :])
            else:  # the sublayers are next to each other in the whole: one product for both
                product(whole[b, 1 + depth :], out[b, 1 + depth :])
            if not running_sums:
                continue
            torch.add(out[b, 1 + depth : 1 + 2 * depth], out[b, 1 + 2 * depth :], out=out[b, 1 : 1 + depth])
            out[b, : 1 + depth].cumsum_(0)
        scales = stream_scales(residual, attention, mlp, self.eps) if whole is None else _scale(whole, self.eps)
        return out, scales

    def finish(self, centred: torch.Tensor, scales: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Stream logits from ``E_c v`` ``[B, S', T, C]`` under this projection's settings, in place.

        ``fresh`` divides each vector by its own scale (``scales``, ``[B, S', T]``);
        ``cached`` by the scale of ``x_L`` at the same token (``last``, ``[B, 1, T]``).
        """
        divisor = self._divisors(scales, last)
        # One fused pass (offset + centred / scale) written over ``centred``: half the memory traffic of div_ then add_.
        return torch.addcdiv(self.offset, centred, divisor.unsqueeze(-1), out=centred)

    @functools.cached_property
    def centred_embedding(self) -> torch.Tensor:
        """``E_c`` (``[C, D]``) of the main head (:func:`centred_embedding`), computed once per projection."""
        return centred_embedding(self.readouts[0].head.weight, self.final_norm)

    @functools.cached_property
    def offset(self) -> torch.Tensor:
        """``E beta_F + beta`` (``[C]``; without ``beta`` when the bias is off): what the closed form adds back.

        Like :attr:`centred_embedding`, computed once per projection (the weights are frozen while it lives),
        not once per stream kind that :meth:`finish` is called on.
        """
        norm, head = cast(nn.LayerNorm, self.final_norm), self.readouts[0].head
        offset = torch.zeros_like(head.weight[:, 0]) if norm.bias is None else head.weight @ norm.bias
        if self.settings.bias and head.bias is not None:
            offset = offset + head.bias
        return offset

    @property
    def eps(self) -> float:
        return float(cast(nn.LayerNorm, self.final_norm).eps)

    def pooled(self, tokens: torch.Tensor, last_layer: torch.Tensor | None = None) -> torch.Tensor:
        """The model's read-out applied to token sequences ``[..., T, D]`` of any layer: ``[..., C]``.

        Every head of the read-out, averaged (DeiT's two). ``last_layer`` (``[..., T, D]`` of
        ``x_L``) supplies the cached scale.
        """
        total = None
        for readout in self.readouts:
            logits = self.read_out(readout, tokens, last_layer)
            total = logits if total is None else total + logits
        assert total is not None
        return total / len(self.readouts)

    def read_out(self, readout: Readout, tokens: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """One head's read-out of ``[..., T, D]``: the norm on every token then pooling, or pooling then the norm.

        With the norm before a mean, the result is the mean of the per-token projections
        (the head is linear): docs/methods.md's identity for ``fc_norm=False`` GAP models.
        """
        if self.norm_before_pool:
            return self._linear(readout.head, readout.pool(self.normalise(tokens, last_layer)))
        reference = None if last_layer is None else readout.pool(last_layer)
        return self._linear(readout.head, self.normalise(readout.pool(tokens), reference))


def centred_embedding(weight: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``E_c`` ``[C, D]``: class embeddings ``weight`` ``[C, D]`` through the final norm's gain, rows centred.

    A LayerNorm subtracts each vector's mean before its gain ``g``, so ``E (g * (v - mean v))``
    equals ``E_c v`` with ``E_c = E diag(g)`` and each row centred: the linear part of the
    projection (the module docstring). A final norm that subtracts no mean (an RMS norm)
    leaves the rows as they are. Computed in ``weight``'s dtype; the gain is cast to it.
    """
    gain = getattr(norm, "weight", None)
    if isinstance(gain, torch.Tensor):
        weight = weight * gain.to(weight.dtype)
    if isinstance(norm, nn.LayerNorm):
        weight = weight - weight.mean(dim=-1, keepdim=True)
    return weight


def centred_stream_logits(
    residual: torch.Tensor, attention: torch.Tensor, mlp: torch.Tensor, weight: torch.Tensor
) -> CentredStreams:
    """:meth:`ClassProjection.centred`'s products as functional expressions, for graph export.

    ``weight`` is ``E_c`` ``[C, D]``. The residual streams' ``E_c x_b`` are running sums of
    ``E_c x_0`` and the sublayers' products. Three products, not one over the streams
    stacked: slicing one product apart would copy it.
    """
    first = residual[:, :1] @ weight.T  # [B, 1, T, C]
    attention_logits, mlp_logits = attention @ weight.T, mlp @ weight.T  # [B, L, T, C] each
    running = first + torch.cumsum(attention_logits + mlp_logits, dim=1)
    return CentredStreams(torch.cat([first, running], dim=1), attention_logits, mlp_logits)


def stream_scales(residual: torch.Tensor, attention: torch.Tensor, mlp: torch.Tensor, eps: float) -> torch.Tensor:
    """``s(v)`` of every token of every stream, in :meth:`ClassProjection.streams`'s order: ``[B, S, T]``."""
    return torch.cat([_scale(residual, eps), _scale(attention, eps), _scale(mlp, eps)], dim=1)


def _scale(v: torch.Tensor, eps: float) -> torch.Tensor:
    """The LayerNorm's divisor ``sqrt(var(v) + eps)`` for every vector of ``v``: ``[..., D] -> [...]``.

    In one pass over ``v`` as ``E[v^2] - E[v]^2``: two reductions and no ``v - mean``
    temporary (in an explainer graph that temporary is a 22 MB write for vit_base, ~1.5 ms).
    Its rounding grows with ``mean^2 / var``, which is at most 0.03 in every stream of the
    bundled and benchmark models (measured; relative error 2.4e-7 against float64, as the
    two-pass form's 2.0e-7); a graph whose scales disagreed would fail its verification.
    """
    # Not Tensor.var: on CPU it is a single-threaded two-pass kernel, measured 15x slower than
    # a vector norm (40 ms vs 2.4 ms for 37 x 197 vectors of 768, vit_base's streams of one image).
    mean = v.mean(dim=-1)
    mean_square = torch.linalg.vector_norm(v, dim=-1).square() / v.shape[-1]
    return torch.sqrt((mean_square - mean.square()).clamp_min(0) + eps)
