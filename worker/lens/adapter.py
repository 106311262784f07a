"""What the lens needs of a model family, and the one traced forward pass built on it.

Notation follows docs/methods.md ("Notation"): ``P`` prefix tokens, ``N = h*w`` image
tokens, ``L`` pre-norm blocks with ``x' = x + a_b`` and ``x_b = x' + m_b``.

The projection, ranks, maps and gradient map are written once, against
:class:`LensModel`. A family (timm ``VisionTransformer``, timm ``Eva``, Hugging Face
ViT and DeiT) is one small subclass that says where its parts are: the blocks, the
two modules whose outputs are exactly ``a_b`` and ``m_b``, how to materialise the
attention probabilities, the final norm ``F``, the read-out (pooling and head) and
the logits. Adding a family never touches the projection.

:meth:`LensModel.trace` runs the model once: ``x_0`` is the first block's input,
``x_b`` block ``b``'s output, ``a_b`` and ``m_b`` the sublayer outputs, all recorded
by wrappers (:func:`recorded`) and hooks that are always removed, even when the pass fails. The logits are the
model's own forward pass.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from worker.lens.workspace import Workspace, empty

if TYPE_CHECKING:  # the projection imports this module
    from worker.lens.projection import CentredStreams

# How the read-out reduces a token sequence to one vector (timm's ``global_pool`` names).
Pooling = Literal["token", "avg", "max", "avgmax"]


class UnsupportedModelError(ValueError):
    """The model is not one the lens knows how to open up; the message names what and why."""


@dataclass(frozen=True)
class ViTSpec:
    """The shape of a supported ViT, read from the model itself."""

    prefix_tokens: tuple[str, ...]  # names in sequence order: "cls", "dist", "reg0", ...
    grid: tuple[int, int]  # (h, w) image tokens
    patch_size: tuple[int, int]  # pixels per patch (height, width)
    depth: int  # L
    width: int  # D
    num_classes: int  # C
    num_heads: int
    pooling: Pooling
    # Post-norm blocks (timm ResPostBlock): a_b and m_b are the sublayer outputs through the block's own norm.
    post_norm: bool = False

    @property
    def num_prefix(self) -> int:
        return len(self.prefix_tokens)

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Readout:
    """One head of the model's read-out: the tokens it pools, how, and the linear layer it applies.

    ``token`` is the prefix position read by ``"token"`` pooling; the other poolings reduce
    the tokens from ``start`` on (the image tokens, or all tokens where the model says so).
    """

    head: nn.Linear
    pooling: Pooling
    token: int = 0
    start: int = 0

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., T, D] -> [..., D]``, exactly as the model pools its last layer."""
        if self.pooling == "token":
            return tokens[..., self.token, :]
        rest = tokens[..., self.start :, :]
        if self.pooling == "avg":
            return rest.mean(dim=-2)
        if self.pooling == "max":
            return rest.amax(dim=-2)
        return 0.5 * (rest.amax(dim=-2) + rest.mean(dim=-2))


@dataclass
class Trace:
    """Everything one forward pass exposes, for a batch of ``B`` images.

    ``T = P + N`` tokens. Block ``b`` (1-based in docs/methods.md) is index ``b - 1``
    of ``attention`` and ``mlp``, and index ``b`` of ``residual`` (index 0 is ``x_0``).
    """

    logits: torch.Tensor  # [B, C], the model's own output
    residual: torch.Tensor  # [B, L + 1, T, D]: x_0 .. x_L, before the final norm
    attention: torch.Tensor | None  # [B, L, T, D]: a_b, or None if not asked for
    mlp: torch.Tensor | None  # [B, L, T, D]: m_b
    attention_probs: list[torch.Tensor] | None  # L x [B, H, T, T]
    # An ONNX explainer graph projects in the graph (worker.onnx_export.ExplainerGraph) and returns,
    # instead of the sublayers, E_c v of every stream (a worker.lens.projection.CentredStreams) and
    # the norm's scale s(v) of every stream, [B, S, T] in the order x, a, m.
    centred: CentredStreams | None = None
    scales: torch.Tensor | None = None
    # [B, S, T, D]: x, a and m in one tensor, when the trace wrote them into one buffer (residual,
    # attention and mlp are then views of it).
    streams: torch.Tensor | None = None


class TensorSink(Protocol):
    """Where hooks and wrappers put what they capture: a list, or anything that reduces tensors as they come."""

    def append(self, tensor: torch.Tensor, /) -> None: ...


class _StreamBuffer:
    """One ``[B, S, T, D]`` buffer for every stream of a trace, taken from a workspace when ``x_0`` arrives.

    The streams in :meth:`~worker.lens.projection.ClassProjection.streams`'s order (``x_0 .. x_L``,
    then ``a_1 .. a_L``, ``m_1 .. m_L``), so that what reads them all (the norm's scales) reads one tensor.
    """

    def __init__(self, workspace: Workspace | None, streams: int):
        self.workspace, self.streams = workspace, streams
        self.buffer: torch.Tensor | None = None
        self.slots: tuple[torch.Tensor, ...] = ()

    def slot(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Stream ``index`` of the buffer, ``[B, T, D]``; the buffer is shaped after ``like`` when it first arrives.

        The views of all streams are taken at once (one ``unbind``), not one indexing per recorded
        tensor: on a small model the recording's own Python work is a visible share of the pass.
        """
        if self.buffer is None:
            shape = (like.shape[0], self.streams, *like.shape[1:])
            self.buffer = empty(self.workspace, "streams", shape, like.dtype, like.device)
            self.slots = self.buffer.unbind(1)
        return self.slots[index]


class _Slots:
    """A :class:`TensorSink` that copies the ``i``-th tensor it receives into stream ``start + i`` of a buffer.

    The streams are written, as the pass produces them, where they are kept, rather than held
    as a list of the model's own outputs and stacked after the pass.
    """

    def __init__(self, streams: _StreamBuffer, start: int, slots: int):
        self.streams, self.start, self.slots = streams, start, slots
        self.filled = 0

    def append(self, tensor: torch.Tensor) -> None:
        self.streams.slot(self.start + self.filled, tensor).copy_(tensor)
        self.filled += 1

    def result(self) -> torch.Tensor:
        """``[B, slots, T, D]``: a view of the streams' buffer."""
        if self.streams.buffer is None or self.filled != self.slots:
            raise RuntimeError(f"the trace saw {self.filled} of the {self.slots} tensors of a stream")
        return self.streams.buffer[:, self.start : self.start + self.slots]


def _tensor(output: Any) -> torch.Tensor:
    """A module's main output: Hugging Face attention modules return ``(hidden, weights)``."""
    return output[0] if isinstance(output, tuple) else output


def save_output(store: TensorSink) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        store.append(_tensor(output))

    return hook


def _detach_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (args[0].detach(), *args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: kwargs[name].detach()}


@contextmanager
def hooked(module: nn.Module, hook: Callable[..., Any], *, pre: bool = False) -> Iterator[None]:
    """A forward (or forward-pre) hook that is removed on leaving the block, whatever happens."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


_TRACING: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_TRACING_GUARD = threading.Lock()


@contextmanager
def tracing(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s trace lock: a worker of the threads pool may explain one loaded model in two threads."""
    with _TRACING_GUARD:
        lock = _TRACING.setdefault(model, threading.Lock())
    with lock:
        yield


@contextmanager
def recorded(
    module: nn.Module, *, inputs: TensorSink | None = None, outputs: TensorSink | None = None
) -> Iterator[None]:
    """While in the block, every call of ``module`` appends its first input to ``inputs`` and its output to ``outputs``.

    What a forward pre-hook and a forward hook would record, by wrapping the module's ``forward``
    for the length of the block instead: a module with hooks goes through torch's general call
    path, whose Python work on every call was a tenth of a small model's forward pass with the
    lens's 3L + 1 hooks, while a wrapped ``forward`` keeps the plain one. Wrappers nest (the
    latest wraps the one before) and leave on exit, whatever happens, the module as it was.
    """
    own = module.__dict__.get("forward")  # a forward set on the instance itself (another wrapper), if any
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if inputs is not None:
            inputs.append(args[0] if args else next(iter(kwargs.values())))
        output = inner(*args, **kwargs)
        if outputs is not None:
            outputs.append(_tensor(output))
        return output

    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward


@contextmanager
def _hooked_with_kwargs(module: nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """A forward-pre hook that also sees keyword arguments (some families call blocks by keyword)."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def save_as_leaf(store: list[torch.Tensor]) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    """A forward hook that swaps the module's output for a leaf requiring grad, and keeps it.

    The rest of the pass is built on the leaf, so gradients with respect to it
    exist even when no parameter requires grad.
    """

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        return leaf

    return hook


class LensModel(ABC):
    """One model opened up for the lens. Subclasses read their parts in ``__init__`` and refuse
    (:class:`UnsupportedModelError`, naming what and why) any configuration whose streams do
    not satisfy ``x_b = x_{b-1} + a_b + m_b`` or whose logits are not a read-out of ``x_L``.

    Attributes every family sets:

    - ``spec``: prefix tokens, grid, depth, width, classes, heads, pooling;
    - ``final_norm``: ``F`` of the projection (docs/methods.md: ``model.norm`` for CLS models,
      ``fc_norm`` for GAP models; whichever the model applies);
    - ``norm_before_pool``: ``F`` runs on every token before pooling (timm GAP models with
      ``fc_norm=False``), rather than on the pooled vector;
    - ``readouts``: the heads and their pooling (two for DeiT's distilled models, averaged);
    - ``input_shape``: ``(C, H, W)`` of the images the model takes.
    """

    family: ClassVar[str]
    spec: ViTSpec
    final_norm: nn.Module
    norm_before_pool: bool
    readouts: tuple[Readout, ...]
    input_shape: tuple[int, int, int]

    def __init__(self, model: nn.Module):
        self.model = model

    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The blocks, in order; block ``b`` takes ``x_{b-1}`` as its first input and returns ``x_b``."""

    @abstractmethod
    def branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are exactly ``a_b`` and ``m_b`` (before the residual additions)."""

    @abstractmethod
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own logits ``[B, C]``."""

    @abstractmethod
    def attention_probabilities(self, store: TensorSink, as_leaves: bool = False) -> AbstractContextManager[None]:
        """Record every block's attention probabilities ``A_b`` (``[B, H, T, T]``) into ``store``.

        ``as_leaves`` makes each ``A_b`` a leaf that requires grad (``store`` is then a list),
        for the gradient relevance map; a family that cannot do that raises
        :class:`UnsupportedModelError` saying so.
        """

    def trace(
        self,
        images: torch.Tensor,
        *,
        sublayers: bool = True,
        attention_probs: bool = False,
        for_attention_gradients: bool = False,
        workspace: Workspace | None = None,
    ) -> Trace:
        """One forward pass with the residual stream, sublayer outputs and (optionally) attention probabilities.

        ``for_attention_gradients`` makes every ``A_b`` a leaf that requires grad and
        cuts the graph between blocks (each block's input is detached), so that a
        loss computed from block ``b``'s output has gradients with respect to
        ``A_b`` only through block ``b``: the gradient relevance map needs exactly that.

        With a ``workspace`` (and without gradients) the streams are copied, as the pass
        produces them, into its buffers (:mod:`worker.lens.workspace`): the same values, in
        memory that the next call reuses, valid while the caller holds the workspace's lease.

        One trace of a model at a time (:func:`tracing`): what records a pass is set on the
        model's modules, so two threads tracing one model at once would record each other's.
        """
        with tracing(self.model):
            return self._trace(images, sublayers, attention_probs, for_attention_gradients, workspace)

    def _trace(
        self,
        images: torch.Tensor,
        sublayers: bool,
        attention_probs: bool,
        for_attention_gradients: bool,
        workspace: Workspace | None,
    ) -> Trace:
        blocks = self.blocks()
        if workspace is not None and not torch.is_grad_enabled():
            return self._trace_into(workspace, images, sublayers=sublayers, attention_probs=attention_probs)
        residual: list[torch.Tensor] = []
        attention: list[torch.Tensor] = []
        mlp: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        with ExitStack() as stack:
            self._record_streams(stack, blocks, residual, attention, mlp, sublayers=sublayers)
            if attention_probs or for_attention_gradients:
                stack.enter_context(self.attention_probabilities(probs, as_leaves=for_attention_gradients))
            if for_attention_gradients:
                for block in blocks:
                    stack.enter_context(_hooked_with_kwargs(block, _detach_input))
            logits = self.logits(images)
        return Trace(
            logits=logits,
            residual=torch.stack(residual, dim=1),
            attention=torch.stack(attention, dim=1) if sublayers else None,
            mlp=torch.stack(mlp, dim=1) if sublayers else None,
            attention_probs=probs or None,
        )

    def _record_streams(
        self,
        stack: ExitStack,
        blocks: Sequence[nn.Module],
        residual: TensorSink,
        attention: TensorSink,
        mlp: TensorSink,
        *,
        sublayers: bool,
    ) -> None:
        """Record each stream as the pass produces it (:func:`recorded`): ``x_0`` (block 1's input), then each
        block's output to ``residual``; each attention and MLP branch's output to ``attention`` and ``mlp``."""
        stack.enter_context(recorded(blocks[0], inputs=residual))
        for block in blocks:
            stack.enter_context(recorded(block, outputs=residual))
            if sublayers:
                attention_branch, mlp_branch = self.branches(block)
                stack.enter_context(recorded(attention_branch, outputs=attention))
                stack.enter_context(recorded(mlp_branch, outputs=mlp))

    def _trace_into(
        self, workspace: Workspace, images: torch.Tensor, *, sublayers: bool, attention_probs: bool
    ) -> Trace:
        """:meth:`trace` without gradients, the streams written into ``workspace``'s buffers."""
        blocks = self.blocks()
        depth = len(blocks)
        streams = _StreamBuffer(workspace, 1 + 3 * depth if sublayers else depth + 1)
        residual = _Slots(streams, 0, depth + 1)
        attention = _Slots(streams, depth + 1, depth)
        mlp = _Slots(streams, 2 * depth + 1, depth)
        probs: list[torch.Tensor] = []
        with ExitStack() as stack:
            self._record_streams(stack, blocks, residual, attention, mlp, sublayers=sublayers)
            if attention_probs:
                stack.enter_context(self.attention_probabilities(probs))
            logits = self.logits(images)
        return Trace(
            logits=logits,
            residual=residual.result(),
            attention=attention.result() if sublayers else None,
            mlp=mlp.result() if sublayers else None,
            attention_probs=probs or None,
            streams=streams.buffer,
        )


def linear_head(head: nn.Module, where: str) -> nn.Linear:
    """The head as one linear layer, or the refusal every family gives for anything else."""
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{where} is {type(head).__name__}, not one linear layer: the class embeddings E are the rows "
            "of a linear head's weight, so the lens needs one"
        )
    return head


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair."""
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)
