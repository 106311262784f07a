"""Which :class:`~worker.lens.adapter.LensModel` opens a model: one adapter per family.

timm's ``VisionTransformer`` (with DeiT's distilled subclass) and ``Eva``, and Hugging Face
transformers' ViT and DeiT classifiers. transformers is imported only when a model comes
from it, so timm-only workers never pay for it.
"""

from __future__ import annotations

from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model_store.manifest import Structure
from worker.lens.adapter import LensModel, UnsupportedModelError
from worker.lens.eva import TimmEva
from worker.lens.vit import TimmViT

SUPPORTED_FAMILIES = (
    "timm VisionTransformer (CLS, GAP, max or avgmax pooling; either final-norm placement; DeiT distilled; "
    "register tokens; pre-norm or post-norm blocks), timm Eva (EVA, EVA-02), transformers ViTForImageClassification, "
    "DeiTForImageClassification and DeiTForImageClassificationWithTeacher"
)


def open_model(model: nn.Module | LensModel) -> LensModel:
    """The family adapter of ``model`` (a model already opened is returned as it is).

    :class:`UnsupportedModelError` names what is unsupported and why, for a configuration of a
    known family as for an unknown class.
    """
    if isinstance(model, LensModel):
        return model
    if isinstance(model, VisionTransformer):
        return TimmViT(model)
    if isinstance(model, Eva):
        return TimmEva(model)
    if type(model).__module__.startswith("transformers."):
        from worker.lens.hf_vit import HFViT

        return HFViT(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a timm VisionTransformer, nor any other model family the class-embedding "
        f"lens opens; supported: {SUPPORTED_FAMILIES}"
    )


def describe(model: nn.Module) -> Structure:
    """The manifest's :class:`Structure` of ``model``; :class:`UnsupportedModelError` if the lens cannot open it."""
    lens = open_model(model)
    spec = lens.spec
    return Structure(
        family=lens.family,
        layers=spec.depth,
        grid=spec.grid,
        patch_size=spec.patch_size,
        prefix_tokens=spec.prefix_tokens,
        pooling=spec.pooling,
        width=spec.width,
        heads=spec.num_heads,
    )
