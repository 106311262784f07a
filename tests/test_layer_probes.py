"""Per-layer probes and the projection's accuracy: the split, and both against direct computations."""

import pytest
import torch

from tests.test_representations import tiny_resnet, tiny_vit
from worker.analyses.layer_probes import held_out, layer_probes, probe_positions
from worker.analyses.probes import probe_accuracy
from worker.analyses.representations import describe
from worker.lens.projection import ClassProjection
from worker.lens.vit import trace


def test_every_fourth_image_is_held_out():
    mask = held_out(10)
    assert mask.tolist() == [False, False, False, True] * 2 + [False, False]


def test_positions_follow_the_representation():
    vit, cnn = describe(tiny_vit()), describe(tiny_resnet())
    assert probe_positions(vit, "tokens") == ["cls", "gap", "token"]
    assert probe_positions(vit, "gap") == ["gap"]
    assert probe_positions(cnn, "tokens") == ["gap", "map"]
    assert probe_positions(describe(tiny_vit(class_token=False, global_pool="avg")), "tokens") == ["gap", "token"]
    with pytest.raises(ValueError, match="no 'cls'"):
        probe_positions(cnn, "cls")


def test_vit_probes_and_projection_match_direct_computations():
    model = tiny_vit()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 32, 32, generator=generator)
    with torch.no_grad():
        run = trace(model, images, sublayers=False)
    labels = run.logits.argmax(dim=-1)  # the model's own predictions: the last layer's projection is exact
    batches = [(images[:12], labels[:12]), (images[12:], labels[12:])]
    curves = layer_probes(model, batches, num_classes=5, ridge=0.5)
    test = held_out(24)
    assert (curves.train, curves.test) == (18, 6)
    assert curves.projection[-1] == 1.0
    projection = ClassProjection(model)
    for b in range(3):
        x = run.residual[:, b + 1]
        cls = probe_accuracy(x[~test, 0], labels[~test], x[test, 0], labels[test], 5, 0.5)
        token = x[:, 1 + 2 * 4 + 2]  # grid centre of a 4x4 grid: row 2, column 2
        single = probe_accuracy(token[~test], labels[~test], token[test], labels[test], 5, 0.5)
        assert curves.accuracy["cls"][b] == pytest.approx(cls)
        assert curves.accuracy["token"][b] == pytest.approx(single)
        predicted = projection.pooled(x).argmax(dim=-1)
        assert curves.projection[b] == pytest.approx(float((predicted[test] == labels[test]).double().mean()))


def test_cnn_probes_have_no_projection():
    model = tiny_resnet()
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3] * 2)
    curves = layer_probes(model, [(images, labels)], num_classes=4)
    assert curves.projection is None
    assert curves.positions == ["gap", "map"]
    assert all(len(values) == 5 for values in curves.accuracy.values())
    assert all(0.0 <= v <= 1.0 for values in curves.accuracy.values() for v in values)
