"""Key-value memories: the class directions, the statistics, planted memories and key-value agreement."""

import pytest
import torch

from tests.test_representations import tiny_vit
from worker.analyses.memories import (
    class_directions,
    key_value_agreement,
    memory_scores,
    memory_statistics,
    top_memories,
)
from worker.lens.projection import ClassProjection


def test_class_directions_are_the_linear_part_of_the_fresh_projection():
    model = tiny_vit()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)  # a gain that is not all ones
        model.norm.bias.uniform_(-1.0, 1.0)
        projection = ClassProjection(model)
        # z(v) - z(-v) = 2 E_g v / s(v) for the fresh norm: rebuild E_g column by column from the projection.
        basis = torch.eye(32)
        scale = torch.sqrt(basis.var(dim=-1, unbiased=False) + model.norm.eps)
        columns = (projection(basis) - projection(-basis)) * scale[:, None] / 2  # [D, C]
    rebuilt = torch.nn.functional.normalize(columns.T.double(), dim=-1)
    assert torch.allclose(class_directions(model), rebuilt, atol=1e-5)


def test_a_planted_value_vector_is_the_top_memory_of_its_class():
    model = tiny_vit()
    directions = class_directions(model)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[:, 7] = 3.0 * directions[3].float()
    scores = memory_scores(model)
    assert scores.shape == (3, 5, 128)
    assert scores[1, 3, 7] == pytest.approx(1.0, abs=1e-6)
    assert top_memories(scores, 2)[1][3][0] == (7, pytest.approx(1.0, abs=1e-6))
    assert memory_statistics(scores, 1)["top_score"][1] > memory_statistics(scores, 1)["top_score"][0]


def test_statistics_on_hand_made_scores():
    scores = torch.tensor([[[0.9, 0.1, 0.5], [0.2, 0.8, 0.6]]], dtype=torch.float64)  # 1 block, 2 classes, 3 units
    one = memory_statistics(scores, 1)
    assert one["top_score"].item() == pytest.approx(0.85)
    assert one["margin"].item() == pytest.approx(0.7)
    assert one["exclusive_share"].item() == 1.0
    two = memory_statistics(scores, 2)  # class 0: units 0, 2; class 1: units 1, 2
    assert two["top_score"].item() == pytest.approx(0.7)
    assert two["margin"].item() == pytest.approx((0.7 - 0.1 + 0.7 + 0.1) / 4)
    assert two["exclusive_share"].item() == 0.75


def test_key_value_agreement_with_planted_keys_and_values():
    model = tiny_vit()
    directions = class_directions(model)
    with torch.no_grad():
        for b, favoured in ((0, range(0, 5)), (1, range(5, 10))):
            mlp = model.blocks[b].mlp
            mlp.fc1.weight.zero_()  # every token's top-5 keys: the favoured units
            mlp.fc1.bias.zero_()
            mlp.fc1.bias[list(favoured)] = 10.0
            mlp.fc2.weight[:, :5] = directions[2].float()[:, None]  # class 2's top-5 values: units 0..4
    scores = memory_scores(model)
    assert set(scores[0, 2].topk(5).indices.tolist()) == set(range(5))
    images = torch.randn(4, 3, 32, 32)
    agreement = key_value_agreement(model, scores, [(images, torch.full((4,), 2))])
    assert agreement[0] == 1.0
    assert agreement[1] == 0.0
    assert 0.0 <= agreement[2] <= 1.0
    assert not any(block.mlp.fc1._forward_hooks for block in model.blocks)
