"""The CPU's last pass over the stream logits: running sums, the norm's division and the ranks, one row at a time.

After the class products, three steps remain of a full explanation (docs/methods.md,
"Class-embedding projection"): the residual streams' ``E_c x_b`` as running sums of
``E_c x_0`` and the sublayers' ``E_c a_j + E_c m_j``; every row finished into logits,
``z = (E_c v) / s + offset``; and the rank of each target in every row. As torch operations
they are four passes over the ``[B, S, T, C]`` logits (an add, a cumulative sum, ``addcdiv``
and :func:`worker.lens.ranks.class_rank`); here they are one compiled loop that takes each
token's rows while they are in the cache.

The arithmetic is the torch operations' own, so the logits and ranks are bit-identical to
theirs: the sum of a sublayer pair in float32, the running sum in float64 (what torch's CPU
cumulative sum accumulates in), and ``offset + centred / divisor`` in float32 (``addcdiv``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from worker.lens.ranks import ROWS_PER_TASK, run_in_chunks


def finish_and_rank(
    logits: torch.Tensor,
    divisors: torch.Tensor,
    offset: torch.Tensor,
    targets: torch.Tensor,
    depth: int | None = None,
) -> torch.Tensor:
    """Finish ``E_c v`` ``[B, S, T, C]`` into logits in place and return the ranks of ``targets`` ``[B, K, S, T]``.

    ``divisors`` ``[B, S, T]``: each row's divisor (its own scale, or the cached scale);
    ``offset`` ``[C]``. With ``depth`` the rows are ``x_0 .. x_L, a_1 .. a_L, m_1 .. m_L``
    and only ``x_0``'s and the sublayers' products are filled: the residual rows ``1 .. L``
    are built as running sums first. Without it every row holds its product already.
    CPU tensors (``logits`` and ``divisors`` float32, ``targets`` int64); :func:`fits` says when this applies.
    """
    values, scale, shift = logits.numpy(), divisors.numpy(), offset.detach().numpy()
    wanted = targets.to(torch.int64).numpy()
    batch, streams, tokens, _ = values.shape
    ranks = np.empty((batch, wanted.shape[1], streams, tokens), dtype=np.int64)
    running = -1 if depth is None else depth

    def finish(start: int, stop: int) -> None:
        _finish_tokens(values, scale, shift, wanted, ranks, running, start, stop)

    run_in_chunks(finish, tokens, max(1, ROWS_PER_TASK // streams))
    return torch.from_numpy(ranks)


def fits(logits: torch.Tensor) -> bool:
    """Whether :func:`finish_and_rank` can take these logits: float32 on the CPU, outside autograd (any strides)."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad


@numba.njit(nogil=True, cache=True)
def _finish_tokens(
    values: np.ndarray,
    divisors: np.ndarray,
    offset: np.ndarray,
    targets: np.ndarray,
    ranks: np.ndarray,
    depth: int,
    start: int,
    stop: int,
) -> None:
    """:func:`finish_and_rank` for tokens ``start <= t < stop`` of every image; ``depth < 0``: no running sums."""
    batch, streams, _, classes = values.shape
    total = np.empty(classes, dtype=np.float64)
    for b in range(batch):
        for t in range(start, stop):
            if depth >= 0:
                for c in range(classes):
                    total[c] = values[b, 0, t, c]
                for layer in range(1, depth + 1):
                    for c in range(classes):
                        pair = values[b, depth + layer, t, c] + values[b, 2 * depth + layer, t, c]
                        total[c] += pair
                        values[b, layer, t, c] = np.float32(total[c])
            for s in range(streams):
                row = values[b, s, t]
                divisor = divisors[b, s, t]
                for c in range(classes):
                    row[c] = offset[c] + row[c] / divisor
                for k in range(targets.shape[1]):
                    threshold = row[targets[b, k]]
                    greater = 0
                    for c in range(classes):
                        greater += row[c] > threshold
                    ranks[b, k, s, t] = greater
