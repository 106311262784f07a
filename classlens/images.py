"""Decode untrusted image bytes into a Pillow image, or say clearly why not.

Torch-free: the API validates uploads with it before anything is queued, and the
worker and CLI decode with it too, so both sides refuse the same inputs. Pillow
reads only the header in ``Image.open``; the pixel count is checked there, before
any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

from PIL import Image, UnidentifiedImageError

from model_store.manifest import InputSpec, Preprocessing

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: far above any classifier's input, far below a bomb

ImageProblem = Literal["empty", "unreadable", "unsupported_format", "too_many_pixels", "truncated"]


class ImageError(ValueError):
    """An image the service will not decode; ``problem`` names the reason for clients and metrics."""

    def __init__(self, problem: ImageProblem, detail: str):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, allowed_formats: frozenset[str] = ALLOWED_FORMATS
) -> Image.Image:
    """The first frame of ``data``, fully decoded; :class:`ImageError` for anything else."""
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise ImageError("unreadable", "not a readable image: its format is not recognised") from error
    except (SyntaxError, ValueError, OSError) as error:
        raise ImageError("unreadable", "not a readable image: " + _reason(error)) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError("too_many_pixels", f"the image is too large to decode safely: {error}") from error
    if image.format not in allowed_formats:
        raise ImageError(
            "unsupported_format",
            f"image format {image.format} is not accepted; use one of {', '.join(sorted(allowed_formats))}",
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("unreadable", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"the image has {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
        )
    try:
        image.seek(0)
        image.load()
    except OSError as error:
        problem: ImageProblem = "truncated" if "truncated" in str(error) else "unreadable"
        raise ImageError(problem, f"the image cannot be decoded ({problem}): {_reason(error)}") from error
    except (SyntaxError, ValueError, EOFError) as error:
        raise ImageError("unreadable", f"the image cannot be decoded: {_reason(error)}") from error
    return image


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def fit_to_input(image: Image.Image, spec: InputSpec, steps: Preprocessing) -> Image.Image:
    """Colour mode, resize and centre crop as the manifest says: the picture the network sees.

    The relevance grid covers exactly this picture, so overlays are drawn on it.
    """
    image = image.convert(spec.colour_mode)
    height, width = steps.resize
    if image.size != (width, height):
        image = image.resize((width, height), _RESAMPLE[steps.interpolation])
    if steps.crop is not None:
        crop_h, crop_w = steps.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return image


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__
