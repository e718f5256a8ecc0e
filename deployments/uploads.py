"""Checks for a user's reference image, in the order that keeps a hostile upload cheap:
size while reading (never more than the limit in memory), type from the magic bytes (not
the filename or the client's content type), pixel count from the header (before any pixel
is decoded), and only then a full decode into a plain RGB PNG.

The re-encoded PNG is what the pipeline stores and sends to image providers: one colour
model for every upload, EXIF orientation applied, and metadata (EXIF, GPS) dropped.
"""

from __future__ import annotations

import io
from typing import Literal

import anyio
from fastapi import UploadFile
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from deployments.bodylimit import FORM_ALLOWANCE, UploadBodyLimit  # noqa: F401  (re-exported)

ImageKind = Literal["PNG", "JPEG", "WEBP"]

CHUNK_BYTES = 64 * 1024
_SNIFF_BYTES = 12


class UploadLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="width*height; above 2x PIL's MAX_IMAGE_PIXELS PIL itself refuses the image",
    )


class UploadError(Exception):
    """A rejected upload; `status_code` is the HTTP answer (413, 415 or 422)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def sniff_image_type(head: bytes) -> ImageKind | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _require_type(head: bytes) -> ImageKind:
    kind = sniff_image_type(head)
    if kind is None:
        raise UploadError(415, "image must be PNG, JPEG or WEBP")
    return kind


async def read_upload(file: UploadFile, limits: UploadLimits) -> bytes:
    """The upload's bytes, read in chunks: stops with 413 as soon as the limit is passed and
    with 415 as soon as the first bytes show it is not a supported image."""
    if file.size is not None and file.size > limits.max_bytes:
        raise UploadError(413, f"image is larger than {limits.max_bytes} bytes")
    buffer = bytearray()
    sniffed = False
    while chunk := await file.read(CHUNK_BYTES):
        buffer += chunk
        if len(buffer) > limits.max_bytes:
            raise UploadError(413, f"image is larger than {limits.max_bytes} bytes")
        if not sniffed and len(buffer) >= _SNIFF_BYTES:
            _require_type(bytes(buffer[:_SNIFF_BYTES]))
            sniffed = True
    if not buffer:
        raise UploadError(422, "image is empty")
    _require_type(bytes(buffer[:_SNIFF_BYTES]))
    return bytes(buffer)


def normalize_image(data: bytes, limits: UploadLimits) -> bytes:
    """Check and decode an image and re-encode it as an 8-bit RGB PNG. CPU-bound: async
    callers use `prepare_upload` (or a worker thread)."""
    if not data:
        raise UploadError(422, "image is empty")
    if len(data) > limits.max_bytes:
        raise UploadError(413, f"image is larger than {limits.max_bytes} bytes")
    kind = _require_type(data[:_SNIFF_BYTES])
    try:
        # Lazy: reads the header only. `formats` stops PIL from trying any other decoder.
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError:
        raise UploadError(422, f"image has too many pixels (limit {limits.max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UploadError(422, f"image is not a decodable {kind}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise UploadError(422, "image has no pixels")
        if width * height > limits.max_pixels:
            raise UploadError(422, f"image has {width}x{height} pixels, more than {limits.max_pixels}")
        try:
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError:
            raise UploadError(422, f"image has too many pixels (limit {limits.max_pixels})") from None
        except (OSError, ValueError, SyntaxError, EOFError):
            raise UploadError(422, f"image is truncated or corrupt ({kind})") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


async def prepare_upload(file: UploadFile, limits: UploadLimits) -> bytes:
    """`read_upload` then `normalize_image` in a worker thread: the upload as RGB PNG bytes."""
    data = await read_upload(file, limits)
    return await anyio.to_thread.run_sync(normalize_image, data, limits)


def _to_rgb(image: Image.Image) -> Image.Image:
    """One colour model for every input: transparency is flattened onto white (dropping alpha
    alone would expose whatever colour the transparent pixels happen to hold), 16-bit and
    32-bit greyscale are scaled down rather than clipped to white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return image.convert("I").point(lambda value: value * (1 / 257)).convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
