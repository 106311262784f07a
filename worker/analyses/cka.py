"""Centred kernel alignment between layers and models (docs/methods.md, "Linear CKA", "Minibatch CKA").

The estimator is the minibatch CKA of Nguyen, Raghu & Kornblith (2021), which
Raghu et al. (NeurIPS 2021) use: over minibatches ``i`` of ``n >= 4`` examples,

    CKA = sum_i HSIC1(K_i, L_i) / sqrt(sum_i HSIC1(K_i, K_i) * sum_i HSIC1(L_i, L_i))

with the unbiased ``HSIC1``. ``HSIC1(K, L)`` is the inner product of the
*U-centred* Gram matrices divided by ``n (n - 3)`` (Szekely & Rizzo's
U-centring: zero diagonal, rows and columns centred with ``1 / (n - 2)``, the
grand mean added back with ``1 / ((n - 1)(n - 2))``), so all layer pairs of a
batch come from one matrix product of stacked, flattened U-centred Grams.

Batches of unequal size (a ragged last batch): the sums weight each batch's
``HSIC1`` by ``n_i (n_i - 3)``, which is summing the U-centred inner products
themselves, ``sum_i <K~_i, L~_i>`` (docs/methods.md, "Minibatch CKA with unequal
batches"). Equal weights let a last batch of 4 images count as much as one of 32;
weighting by ``n_i (n_i - 3)`` was the closest to the one-batch value of the rules
measured (docs/benchmarks.md, "Minibatch CKA with a ragged last batch"). With batches
of one size every weight is the same, and the ratio is the paper's estimator.

Numerics: each batch's feature mean is subtracted before the Gram (HSIC1 is
exactly invariant to it, and it removes the cancellation that large constant
offsets cause in float32), Grams and sums are float64, and only ``n x n`` Grams
are kept: memory grows with layers x n^2, never with the data set.
"""

from __future__ import annotations

import torch


class CKAError(ValueError):
    """A request CKA cannot answer (too small a batch, mismatched rows)."""


def gram(features: torch.Tensor) -> torch.Tensor:
    """The linear Gram ``X X^T`` (float64) of ``[n, ...]`` features after subtracting their batch mean."""
    flat = features.reshape(features.shape[0], -1).to(torch.float64)
    flat = flat - flat.mean(dim=0, keepdim=True)
    return flat @ flat.T


def u_centre(gram_matrix: torch.Tensor) -> torch.Tensor:
    """Szekely & Rizzo's U-centring of an ``n x n`` Gram (``n >= 4``); the diagonal is zero."""
    n = gram_matrix.shape[0]
    if n < 4:
        raise CKAError(f"the unbiased HSIC needs at least 4 examples per batch, got {n}")
    k = gram_matrix.clone()
    k.fill_diagonal_(0.0)
    row = k.sum(dim=1, keepdim=True) / (n - 2)
    column = k.sum(dim=0, keepdim=True) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    centred = k - row - column + total
    centred.fill_diagonal_(0.0)
    return centred


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (docs/methods.md's names)
    """The unbiased HSIC of two Grams, from U-centred inner products."""
    n = k.shape[0]
    return (u_centre(k) * u_centre(l)).sum() / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA of two feature sets over the same ``m`` examples, in one batch."""
    if x.shape[0] != y.shape[0]:
        raise CKAError(f"CKA needs the same examples in both: {x.shape[0]} vs {y.shape[0]} rows")
    k, l = gram(x), gram(y)  # noqa: E741
    return float(hsic1(k, l) / torch.sqrt(hsic1(k, k) * hsic1(l, l)))


class MinibatchCKA:
    """Accumulates minibatch CKA between ``rows`` layers of one model and ``columns`` layers of another.

    Call :meth:`add` with every layer's features of a batch as they are produced
    (each is reduced to its U-centred Gram at once), then :meth:`end_batch`.
    For layers of one model against themselves, pass the same names for rows
    and columns. Each batch's ``HSIC1`` enters the sums weighted by ``n (n - 3)``
    (the module docstring): the sums are of U-centred inner products.
    """

    def __init__(self, rows: list[str], columns: list[str]):
        self.rows, self.columns = rows, columns
        self.cross = torch.zeros(len(rows), len(columns), dtype=torch.float64)
        self.row_self = torch.zeros(len(rows), dtype=torch.float64)
        self.column_self = torch.zeros(len(columns), dtype=torch.float64)
        self.batches = 0
        self.examples = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._size: int | None = None

    def add(self, layer: str, features: torch.Tensor) -> None:
        """The features ``[n, ...]`` of one layer for the current batch; kept only as a U-centred Gram."""
        if layer not in self.rows and layer not in self.columns:
            raise KeyError(f"unknown layer {layer!r}")
        n = features.shape[0]
        if self._size is not None and n != self._size:
            raise CKAError(f"layer {layer!r} has {n} rows in a batch of {self._size}: rows must be the same images")
        self._size = n
        self._pending[layer] = u_centre(gram(features)).flatten()

    def end_batch(self) -> None:
        """Fold the batch's Grams into the running sums (one product for all layer pairs)."""
        missing = [name for name in dict.fromkeys(self.rows + self.columns) if name not in self._pending]
        if missing:
            raise CKAError(f"the batch lacks layers {missing}")
        assert self._size is not None
        rows = torch.stack([self._pending[name] for name in self.rows])
        columns = torch.stack([self._pending[name] for name in self.columns])
        # n (n - 3) HSIC1 = <K~, L~>: the weighted sums need no scale. They stay on the CPU;
        # the Grams may live on the model's device.
        self.cross += (rows @ columns.T).cpu()
        self.row_self += (rows * rows).sum(dim=1).cpu()
        self.column_self += (columns * columns).sum(dim=1).cpu()
        self.batches += 1
        self.examples += self._size
        self._pending.clear()
        self._size = None

    def result(self) -> torch.Tensor:
        """``[rows, columns]`` CKA (float64)."""
        if not self.batches:
            raise CKAError("no batch has been added")
        return self.cross / torch.sqrt(self.row_self[:, None] * self.column_self[None, :])
