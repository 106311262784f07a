"""The inputs of a job over many images, read back from the store: the list of images and the images."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from classlens.core.contract import AuditImage, AuditManifest, Job
from classlens.core.images import ImageError, decode_image
from worker.jobs.failures import InputExpired
from worker.jobs.runtime import Runtime


def manifest(rt: Runtime, job: Job, noun: str) -> AuditManifest:
    """The job's list of images (with their labels); :class:`InputExpired` once its TTL ran out."""
    data = rt.jobs.manifest(str(job.parameters.get("manifest_key", "")))
    if data is None:
        raise InputExpired(f"the {noun}'s list of images has expired; submit the {noun} again")
    return AuditManifest.model_validate_json(data)


def decode_all(rt: Runtime, items: Sequence[AuditImage], noun: str) -> list[Image.Image]:
    """The images of ``items`` read from the store and decoded; an error names the file."""
    images = []
    for item in items:
        payload = rt.jobs.image(item.image_key)
        if payload is None:
            raise InputExpired(f"{item.file}: the uploaded image has expired; submit the {noun} again")
        try:
            images.append(decode_image(payload, max_pixels=rt.settings.max_image_pixels))
        except ImageError as error:
            raise ImageError(error.problem, f"{item.file}: {error.detail}") from error
    return images
