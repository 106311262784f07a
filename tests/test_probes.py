import pytest
import torch

from worker.analyses.probes import fit_ridge, probe_accuracy


def separable(m=200, d=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=generator) * 5
    labels = torch.randint(0, classes, (m,), generator=generator)
    return centres[labels] + torch.randn(m, d, generator=generator), labels


def test_probe_separates_separable_classes_and_not_noise():
    x, y = separable()
    assert probe_accuracy(x[:150], y[:150], x[150:], y[150:], 3) > 0.95
    noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    assert probe_accuracy(noise[:150], y[:150], noise[150:], y[150:], 3) < 0.6


def test_primal_and_dual_forms_agree():
    x, y = separable(m=20, d=8)
    wide = torch.cat([x, torch.randn(20, 30, generator=torch.Generator().manual_seed(2))], dim=1)  # d > m: dual
    dual = fit_ridge(wide, y, 3, ridge=0.5)
    # The primal solution of the same problem, written out.
    centred = wide.double() - wide.double().mean(0)
    targets = torch.nn.functional.one_hot(y, 3).double()
    targets = targets - targets.mean(0)
    primal = torch.linalg.solve(centred.T @ centred + 0.5 * torch.eye(38, dtype=torch.float64), centred.T @ targets)
    assert torch.allclose(dual.weights, primal, atol=1e-8)


def test_mismatched_rows_are_refused():
    x, y = separable()
    with pytest.raises(ValueError, match="feature rows"):
        fit_ridge(x, y[:10], 3)
