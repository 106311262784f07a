"""CKA: the properties docs/methods.md lists, against a direct float64 implementation of its formulas."""

import pytest
import torch

from worker.analyses.cka import CKAError, MinibatchCKA, gram, hsic1, linear_cka


def direct_hsic1(x: torch.Tensor, y: torch.Tensor) -> float:
    """docs/methods.md's HSIC1, term by term, in float64, with no centring of features."""
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T  # noqa: E741
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=torch.float64)
    trace = torch.trace(k @ l)
    middle = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (ones.T @ k @ l @ ones)
    return float((trace + middle - last) / (n * (n - 3)))


def direct_cka(x, y):
    return direct_hsic1(x, y) / (direct_hsic1(x, x) * direct_hsic1(y, y)) ** 0.5


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(30, 20, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(
        40, 20, generator=generator, dtype=torch.float64
    )
    return x, y, generator


def test_agrees_with_the_direct_formulas(data):
    x, y, _ = data
    assert abs(float(hsic1(gram(x), gram(y))) - direct_hsic1(x, y)) < 1e-6 * abs(direct_hsic1(x, y))
    assert abs(linear_cka(x, y) - direct_cka(x, y)) < 1e-6


def test_self_similarity_is_one(data):
    x, _, _ = data
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariances(data):
    x, y, generator = data
    base = linear_cka(x, y)
    rotation, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64))
    assert linear_cka(x @ rotation, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 3.0, y - 11.0) == pytest.approx(base, abs=1e-10)
    stretch = torch.diag(torch.linspace(0.1, 10, 30, dtype=torch.float64)) @ torch.randn(
        30, 30, generator=generator, dtype=torch.float64
    )
    assert abs(linear_cka(x @ stretch, y) - base) > 1e-3  # not invariant to a general invertible map


def test_one_batch_minibatch_equals_the_full_data_value(data):
    x, y, _ = data
    accumulator = MinibatchCKA(["x"], ["y"])
    accumulator.add("x", x)
    accumulator.add("y", y)
    accumulator.end_batch()
    assert float(accumulator.result()[0, 0]) == pytest.approx(linear_cka(x, y), abs=1e-12)


def test_minibatch_sums_hsic_over_batches(data):
    x, y, _ = data
    accumulator = MinibatchCKA(["x"], ["y"])
    for part in (slice(0, 20), slice(20, 40)):
        accumulator.add("x", x[part])
        accumulator.add("y", y[part])
        accumulator.end_batch()
    numerator = direct_hsic1(x[:20], y[:20]) + direct_hsic1(x[20:], y[20:])
    xx = direct_hsic1(x[:20], x[:20]) + direct_hsic1(x[20:], x[20:])
    yy = direct_hsic1(y[:20], y[:20]) + direct_hsic1(y[20:], y[20:])
    assert float(accumulator.result()[0, 0]) == pytest.approx(numerator / (xx * yy) ** 0.5, abs=1e-9)
    assert accumulator.examples == 40
    assert accumulator.batches == 2


def test_a_ragged_last_batch_weights_each_batch_by_n_times_n_minus_3(data):
    """docs/methods.md: with unequal batches every batch's HSIC1 counts n (n - 3) times."""
    x, y, _ = data
    accumulator = MinibatchCKA(["x"], ["y"])
    parts = (slice(0, 16), slice(16, 32), slice(32, 36), slice(36, 40))
    for part in parts:
        accumulator.add("x", x[part])
        accumulator.add("y", y[part])
        accumulator.end_batch()

    def weighted(a, b):
        return sum((p.stop - p.start) * (p.stop - p.start - 3) * direct_hsic1(a[p], b[p]) for p in parts)

    want = weighted(x, y) / (weighted(x, x) * weighted(y, y)) ** 0.5
    assert float(accumulator.result()[0, 0]) == pytest.approx(want, abs=1e-9)
    equal = (
        sum(direct_hsic1(x[p], y[p]) for p in parts)
        / (sum(direct_hsic1(x[p], x[p]) for p in parts) * sum(direct_hsic1(y[p], y[p]) for p in parts)) ** 0.5
    )
    assert abs(want - equal) > 1e-3  # the weights matter here: equal weights would give another value


def test_all_layer_pairs_at_once_match_pairwise_values(data):
    x, y, generator = data
    z = torch.randn(40, 10, generator=generator, dtype=torch.float64)
    layers = {"x": x, "y": y, "z": z}
    accumulator = MinibatchCKA(list(layers), list(layers))
    for name, features in layers.items():
        accumulator.add(name, features)
    accumulator.end_batch()
    matrix = accumulator.result()
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            assert float(matrix[i, j]) == pytest.approx(direct_cka(layers[a], layers[b]), abs=1e-9)


def test_large_offsets_in_float32_do_not_drift_or_nan(data):
    x, y, _ = data
    clean = linear_cka(x, y)
    shifted = linear_cka((x + 1000.0).float(), (y + 1000.0).float())
    assert shifted == pytest.approx(clean, abs=1e-4)


def test_batches_below_four_and_mismatched_rows_are_refused(data):
    x, y, _ = data
    with pytest.raises(CKAError, match="at least 4 examples"):
        linear_cka(x[:3], y[:3])
    with pytest.raises(CKAError, match="same examples"):
        linear_cka(x, y[:10])
    accumulator = MinibatchCKA(["x"], ["y"])
    accumulator.add("x", x[:10])
    with pytest.raises(CKAError, match="rows must be the same images"):
        accumulator.add("y", y[:12])
