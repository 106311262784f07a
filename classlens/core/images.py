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

from PIL import Image, ImageOps, UnidentifiedImageError

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


# Pillow's filters by the manifest's names (timm's ``str_to_interp_mode`` names the same six).
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def fit_to_input(image: Image.Image, spec: InputSpec, steps: Preprocessing) -> Image.Image:
    """The picture the network sees: every preprocessing step of the manifest, with Pillow alone.

    In order: the EXIF orientation (when ``steps.exif_orientation``: :func:`upright`), colour
    conversion (``spec.colour_mode``; Pillow's ``convert``, so RGBA loses its
    alpha and grey is replicated, as timm's datasets convert), ``trim_border``, the resize of
    ``resize_mode``, then the centre crop, padded with ``crop_fill`` where the picture is
    smaller. Each step restates the arithmetic of timm's eval transform on PIL images (see
    :mod:`model_store.preprocessing`), so the tensor made from this picture equals timm's.
    The relevance grid covers exactly this picture, so overlays are drawn on it.

    Raises :class:`ImageError` for an image these steps cannot make an input of: one the
    border trim empties, or one so elongated that the aspect-keeping resize would reach more
    than :data:`DEFAULT_MAX_PIXELS` pixels (or none) before the crop.
    """
    if steps.exif_orientation:
        image = upright(image)
    image = image.convert(spec.colour_mode)
    if steps.trim_border:
        image = _trim_border(image, steps.trim_border)
    size = _resized_size(image.size, steps)
    if image.size != size:  # torchvision's Resize also leaves a picture of the right size alone
        image = image.resize(size, _RESAMPLE[steps.interpolation])
    if steps.crop is not None:
        image = _centre_crop_or_pad(image, steps.crop, _fill(image, steps.crop_fill))
    return image


_ORIENTATION = 0x0112  # the EXIF tag; 1 is "as stored"


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (itself, not a copy, when there is nothing to turn)."""
    if image.getexif().get(_ORIENTATION, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _trim_border(image: Image.Image, border: int) -> Image.Image:
    """``border`` pixels off every edge (timm's ``TrimBorder``)."""
    width, height = image.size
    if width <= 2 * border or height <= 2 * border:
        raise ImageError(
            "empty", f"the image is {width}x{height}; trimming {border} pixels from every edge leaves nothing"
        )
    return image.crop((border, border, width - border, height - border))


def _resized_size(size: tuple[int, int], steps: Preprocessing) -> tuple[int, int]:
    """(width, height) after the resize step, from the image's (width, height)."""
    width, height = size
    target_h, target_w = steps.resize
    if steps.resize_mode == "exact":
        return target_w, target_h
    if steps.resize_mode == "shorter":
        # torchvision Resize(int): the shorter edge to the size, the longer ``int(size * long / short)``.
        edge = target_h
        if width <= height:
            new_w, new_h = edge, int(edge * height / width)
        else:
            new_w, new_h = int(edge * width / height), edge
    else:
        # timm ResizeKeepRatio: one ratio between the image-to-target ratios of the two edges,
        # ``max * longest + min * (1 - longest)``, then each edge ``round(edge / ratio)``.
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) * steps.longest + min(ratio_h, ratio_w) * (1.0 - steps.longest)
        new_h, new_w = round(height / ratio), round(width / ratio)
    if new_w < 1 or new_h < 1 or new_w * new_h > DEFAULT_MAX_PIXELS:
        raise ImageError(
            "too_many_pixels" if new_w * new_h > DEFAULT_MAX_PIXELS else "empty",
            f"the {width}x{height} image would be resized to {new_w}x{new_h} before its centre crop; "
            "its aspect ratio is too extreme for this model",
        )
    return new_w, new_h


def _fill(image: Image.Image, crop_fill: tuple[int, ...] | None) -> int | tuple[int, ...]:
    """The padding colour in the form Pillow takes for the image's mode; 0 (black) by default."""
    bands = len(image.getbands())
    values = crop_fill or (0,)
    if len(values) == 1:
        values = values * bands
    if len(values) != bands:
        raise ValueError(f"crop_fill has {len(values)} values for a {image.mode} picture of {bands} channel(s)")
    return values[0] if bands == 1 else tuple(values)


def _centre_crop_or_pad(image: Image.Image, crop: tuple[int, int], fill: int | tuple[int, ...]) -> Image.Image:
    """The centred (height, width) window, padding first where the picture is smaller.

    As torchvision's ``CenterCrop`` and timm's ``CenterCropOrPad`` on PIL images: an edge
    shorter than the window is padded by ``(window - edge) // 2`` before and the rest after;
    then the window's offset is ``round((edge - window) / 2)``, Python's round (half to
    even), not a floor division.
    """
    crop_h, crop_w = crop
    width, height = image.size
    if crop_w > width or crop_h > height:
        # What an edge lacks, split with the smaller half before the picture.
        missing_w, missing_h = max(crop_w - width, 0), max(crop_h - height, 0)
        left, top = missing_w // 2, missing_h // 2
        padded = Image.new(image.mode, (width + missing_w, height + missing_h), fill)
        padded.paste(image, (left, top))
        image = padded
        width, height = image.size
        if (width, height) == (crop_w, crop_h):
            return image
    top = round((height - crop_h) / 2)  # round() of one argument is an int, rounded half to even
    left = round((width - crop_w) / 2)
    return image.crop((left, top, left + crop_w, top + crop_h))


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__
