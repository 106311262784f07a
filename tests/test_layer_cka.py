"""Layer x layer CKA within and across models, and token-localisation CKA, against direct computations."""

import pytest
import torch
from PIL import Image

from classlens.core import fashion_mnist
from classlens.core.contract import AnalysisRequest
from tests.test_representations import tiny_resnet, tiny_vit
from worker.analyses.cka import CKAError, MinibatchCKA
from worker.analyses.job import AnalysisJob, Steps
from worker.analyses.layer_cka import cka_across, cka_within, image_patches, localisation_cka
from worker.lens.vit import trace
from worker.runtime import load


def batches(count=3, size=6, seed=0, channels=3, side=32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, channels, side, side, generator=generator) for _ in range(count)]


def test_within_matches_minibatch_cka_of_traced_features():
    model, data = tiny_vit(), batches()
    result = cka_within(model, data, "gap")
    names = ["block 1", "block 2", "block 3"]
    direct = MinibatchCKA(names, names)
    for batch in data:
        with torch.no_grad():
            run = trace(model, batch, sublayers=False)
        for b, name in enumerate(names, start=1):
            direct.add(name, run.residual[:, b, 1:].mean(dim=1))
        direct.end_batch()
    assert result.rows == names
    assert result.examples == 18
    assert result.batches == 3
    assert torch.allclose(result.values, direct.result(), atol=1e-9)
    assert torch.allclose(result.values.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(result.values, result.values.T, atol=1e-9)


def test_across_with_itself_is_within_and_pairs_rows():
    model, data = tiny_vit(), batches()
    within = cka_within(model, data, "tokens")
    across = cka_across(model, model, [(b, b) for b in data], "tokens")
    assert torch.allclose(across.values, within.values, atol=1e-9)
    # Shuffling the rows of one side breaks the pairing: the diagonal is no longer 1.
    shuffled = cka_across(model, model, [(b, b.flip(0)) for b in data], "tokens")
    assert (shuffled.values.diagonal() < 0.9).all()


def test_across_a_vit_and_a_cnn():
    vit, cnn = tiny_vit(in_chans=1), tiny_resnet()
    data = [(b, b[:, :, 2:30, 2:30]) for b in batches(channels=1)]
    result = cka_across(vit, cnn, data, "gap")
    assert result.values.shape == (3, 5)
    assert result.columns == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert torch.isfinite(result.values).all()
    assert (result.values <= 1 + 1e-9).all()


def test_batches_under_four_images_are_refused():
    model = tiny_vit()
    with pytest.raises(CKAError, match="at least 4"):
        cka_within(model, [torch.randn(6, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    with pytest.raises(CKAError, match="same images"):
        cka_across(model, model, [(torch.randn(6, 3, 32, 32), torch.randn(5, 3, 32, 32))])


def test_image_patches_are_cut_like_the_patch_embedding():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = image_patches(images, (8, 8))
    assert patches.shape == (2, 16, 3 * 64)
    # patch 5 is grid row 1, column 1: pixels 8..15 x 8..15
    assert torch.equal(patches[1, 5], images[1, :, 8:16, 8:16].reshape(-1))


def test_localisation_finds_each_token_at_its_own_patch_when_blocks_do_nothing():
    model = tiny_vit(depth=2, img_size=16, patch_size=4, in_chans=1)  # 16 pixels per patch, width 32
    with torch.no_grad():  # zero branches: x_L = x_0, token j a linear function of patch j only
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    maps = localisation_cka(model, batches(count=8, size=16, channels=1, side=16))
    assert maps.maps.shape == (16, 4, 4)
    assert maps.examples == 128
    own = maps.maps.flatten(1).diagonal()
    off = maps.maps.flatten(1)[~torch.eye(16, dtype=torch.bool)]
    assert own.min() > 0.6  # not 1: a random 16 -> 32 linear map is not orthogonal
    assert off.abs().max() < 0.2  # independent pixels: chance level
    assert maps.own_position_share() == 1.0
    assert maps.mean_offset((8, 8)) == 0.0


def test_a_constant_patch_has_no_cka_and_never_wins():
    model = tiny_vit(depth=2)
    data = batches(count=2, size=8)
    for batch in data:
        batch[:, :, :8, :8] = 0.0  # patch 0 is blank in every image
    maps = localisation_cka(model, data)
    assert torch.isnan(maps.maps[:, 0, 0]).all()
    assert not (maps.best_patches() == 0).any()


@pytest.mark.integration  # Fashion-MNIST test images
def test_a_ragged_last_batch_stays_within_0_01_of_one_batch_on_fmnist_vit(bundled_catalog):
    """100 Fashion-MNIST test images through the ``cka`` analysis: batches of 32 (32+32+32+4) against one of 100.

    Any batching moves the minibatch estimate a little from the one-batch value (about 0.01 at most
    over the matrix here, docs/benchmarks.md); equal weights let the batch of 4 move it by 0.06 on
    these images.
    """
    loaded = load(bundled_catalog.resolve("fmnist-vit@1"), torch.device("cpu"), require_vit=False)
    pixels, _ = fashion_mnist.load("test")
    images = [Image.fromarray(pixels[i], "L") for i in range(200, 300)]
    matrices = []
    for size in (32, 100):  # the analysis's own batches (AnalysisJob.spans), without drawing its figure
        job = AnalysisJob(AnalysisRequest(kind="cka", batch_size=size), [loaded], images, None, Steps(lambda *_: None))
        result = cka_within(loaded.network, job.batches(loaded))
        assert result.batches == (4 if size == 32 else 1)
        matrices.append(result.values)
    assert (matrices[0] - matrices[1]).abs().max() < 0.01
