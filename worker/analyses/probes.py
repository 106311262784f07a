"""Closed-form ridge probes per layer (docs/methods.md, "Per-layer linear probes", and section 1,
"Linear-probe comparison").

A probe maps a representation to one-hot class targets by ridge regression,
``W = (X^T X + lambda I)^{-1} X^T Y`` on centred features (solved in float64 in
whichever of the primal or dual form is smaller), and predicts the arg-max of
``X W``. No iterative training, so probes are reproducible and cheap enough to fit
at every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RidgeProbe:
    weights: torch.Tensor  # [D, C]
    feature_mean: torch.Tensor  # [D]
    target_mean: torch.Tensor  # [C]

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        scores = (features.to(torch.float64) - self.feature_mean) @ self.weights + self.target_mean
        return scores.argmax(dim=-1)


def fit_ridge(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = 1.0) -> RidgeProbe:
    """Fit a ridge probe on ``[m, D]`` features and ``[m]`` integer labels."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    x = features.to(torch.float64)
    y = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)
    feature_mean, target_mean = x.mean(0), y.mean(0)
    x, y = x - feature_mean, y - target_mean
    m, d = x.shape
    if d <= m:  # primal: a D x D system
        weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(d, dtype=torch.float64), x.T @ y)
    else:  # dual: an m x m system, W = X^T (X X^T + lambda I)^{-1} Y
        weights = x.T @ torch.linalg.solve(x @ x.T + ridge * torch.eye(m, dtype=torch.float64), y)
    return RidgeProbe(weights, feature_mean, target_mean)


def probe_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ridge: float = 1.0,
) -> float:
    probe = fit_ridge(train, train_labels, num_classes, ridge)
    return float((probe.predict(test) == test_labels.to(probe.weights.device)).double().mean())
