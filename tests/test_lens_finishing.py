"""The CPU's one pass that builds the residual rows, finishes every row and ranks the targets.

It replaces four torch operations (an add, a cumulative sum, ``addcdiv`` and the rank count),
so it is held to their results bit for bit, on one thread and split over two.
"""

import dataclasses

import pytest
import torch

from worker import random_models
from worker.lens.finishing import finish_and_rank, fits
from worker.lens.projection import CentredStreams, ClassProjection, ProjectionSettings
from worker.lens.ranks import class_rank
from worker.lens.vit import trace
from worker.lens.workspace import Workspace


def torch_steps(products, divisors, offset, targets, depth):
    """The four torch operations the pass replaces, on a copy."""
    logits = products.clone()
    if depth is not None:
        torch.add(logits[:, depth + 1 : 2 * depth + 1], logits[:, 2 * depth + 1 :], out=logits[:, 1 : depth + 1])
        logits[:, : depth + 1].cumsum_(1)
    torch.addcdiv(offset, logits, divisors.unsqueeze(-1), out=logits)
    return logits, class_rank(logits, targets)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("depth", [3, None])
def test_the_pass_equals_the_torch_operations_bit_for_bit(threads, depth):
    generator = torch.Generator().manual_seed(0)
    batch, tokens, classes = 2, 90, 37
    streams = 1 + 3 * depth if depth else 5
    products = torch.randn(batch, streams, tokens, classes, generator=generator).round(decimals=2)  # ties too
    divisors = torch.rand(batch, streams, tokens, generator=generator) + 0.5
    offset = torch.randn(classes, generator=generator)
    targets = torch.tensor([[0, 5, 36], [2, 2, 9]])
    expected_logits, expected_ranks = torch_steps(products, divisors, offset, targets, depth)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        logits = products.clone()
        ranks = finish_and_rank(logits, divisors, offset, targets, depth)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(ranks, expected_ranks)


def test_the_pass_takes_strided_views_and_a_broadcast_divisor():
    """The cached scale is one divisor per token broadcast over the streams; ONNX parts may be views."""
    generator = torch.Generator().manual_seed(1)
    whole = torch.randn(1, 9, 20, 11, generator=generator)
    before = whole.clone()
    part = whole[:, 2:7]  # a view with the whole's strides
    last = torch.rand(1, 1, 20, generator=generator) + 0.5
    offset = torch.randn(11, generator=generator)
    targets = torch.tensor([[4, 1]])
    expected_logits, expected_ranks = torch_steps(part, last.expand(1, 5, 20), offset, targets, None)
    ranks = finish_and_rank(part, last.expand(1, 5, 20), offset, targets)
    assert torch.equal(part, expected_logits)
    assert torch.equal(whole[:, :2], before[:, :2])  # nothing outside the view is written
    assert torch.equal(whole[:, 7:], before[:, 7:])
    assert torch.equal(ranks, expected_ranks)


def test_fits_only_cpu_float32_outside_autograd():
    assert fits(torch.zeros(2, 3))
    assert not fits(torch.zeros(2, 3, dtype=torch.float64))
    assert not fits(torch.zeros(2, 3, requires_grad=True))


@pytest.mark.parametrize("settings", [ProjectionSettings(), ProjectionSettings(norm="cached", bias=False)])
def test_a_trace_finished_with_its_targets_equals_finishing_then_ranking(settings):
    """Both of the projection's ways in (the torch trace and an explainer graph's products) give the same logits
    and ranks whether the ranks are counted in the finishing pass or afterwards."""
    model = random_models.random_vit("vit_tiny_patch16_224", img_size=64, num_classes=50)
    projection = ClassProjection(model, settings)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    depth = projection.spec.depth
    with torch.no_grad():
        run = trace(model, images)
        targets = run.logits.topk(3).indices
        plain = projection.of_trace(run)
        expected = torch.cat(plain.parts(), dim=1)
        expected_ranks = plain.ranks(targets)
        with Workspace().lease() as buffers:
            traced = projection.lens.trace(images, workspace=buffers)
            counted = projection.of_trace(traced, workspace=buffers, targets=targets)
            assert torch.equal(torch.cat(counted.parts(), dim=1), expected)
            assert counted.target_ranks is not None
            assert torch.equal(counted.target_ranks, expected_ranks)
        assert run.attention is not None
        assert run.mlp is not None
        centred, scales = projection.centred(run.residual, run.attention, run.mlp)
        graph = dataclasses.replace(
            run, attention=None, mlp=None, centred=CentredStreams.split(centred, depth), scales=scales
        )
        from_graph = projection.of_trace(graph, targets=targets)
        assert torch.equal(torch.cat(from_graph.parts(), dim=1), expected)
        assert from_graph.target_ranks is not None
        assert torch.equal(from_graph.target_ranks, expected_ranks)
