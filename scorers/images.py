"""Image intake: decode bytes safely and bring any PIL image to 8-bit RGB, or fail with ImageError."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MIN_SIDE = 16
"""Smaller images carry nothing to score and confuse channel inference in image processors (1x1x3)."""
MAX_PIXELS = 64_000_000
"""About 8000x8000: larger images are rejected before decoding (decompression bombs, memory)."""
MAX_ASPECT = 100
"""Qwen-VL's resizer refuses aspect ratios above 200; no scene reference is that thin."""


class ImageError(ValueError):
    """An image that cannot be scored: undecodable, too small, too large or of an unusable kind."""


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes (PNG, JPEG, WebP, ...) into an RGB PIL image, checking size before decoding pixels."""
    if not data:
        raise ImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely: {exc}") from exc
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return to_rgb(image)


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if width * height > MAX_PIXELS:
        raise ImageError(f"image is {width}x{height} pixels; at most {MAX_PIXELS} pixels are accepted")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"image is {width}x{height} pixels; aspect ratios above {MAX_ASPECT}:1 are rejected")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB copy of image.

    Transparency is composited onto white (as transformers' convert_rgb does for the CLIP and Qwen processors),
    16-bit and 32-bit integer greyscale is scaled to 8 bits (PIL's own convert would clip it to white),
    palette, greyscale, CMYK and other modes go through PIL's convert.
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(image).__name__}")
    _check_size(image.size)
    try:
        if image.mode == "RGB":
            return image
        if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
            return _high_depth_to_rgb(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot convert a {image.mode} image to RGB: {exc}") from exc


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit modes use the full 0-65535 range; 32-bit "I" (how PIL often opens 16-bit PNGs) only when above 255."""
    array = np.asarray(image)
    if array.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
        eight = np.nan_to_num(array) * scale
    elif image.mode.startswith("I;16") or array.max(initial=0) > 255:
        eight = array.astype(np.float64) / 257.0
    else:
        eight = array
    return Image.fromarray(np.clip(np.round(eight), 0, 255).astype(np.uint8)).convert("RGB")
