import timm
import torch

from worker import torchvision_compat


def test_apply_is_idempotent_and_timm_builds_a_vit():
    # conftest already applied it: a second call has nothing left to define.
    assert torchvision_compat.apply() == []
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_torchvision_operators_exist_after_apply():
    # Whether defined by torchvision's compiled library or by the compat step,
    # both schemas must now be registered, and torchvision's python parts import.
    for name in ("nms", "qnms"):
        assert torchvision_compat._operator_exists(name)
    import torchvision.transforms.functional  # noqa: F401
