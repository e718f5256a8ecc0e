"""Checks for a user's reference image, in the order that keeps a hostile upload cheap: the
request body's size while it streams in (`UploadBodyLimit`, before Starlette parses the form),
the file's size while reading (never more than the limit in memory), type from the magic bytes
(not the filename or the client's content type), pixel count from the header (before any pixel
is decoded), and only then a decode into a plain RGB PNG: at full size for an image that fits
`max_side`, else at reduced scale where the format allows it (JPEG) and downscaled.

The re-encoded PNG is what the pipeline stores and sends to image providers: one colour model
for every upload, EXIF orientation applied, metadata (EXIF, GPS) dropped, and never larger than
a provider's edit call accepts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import anyio
from fastapi import UploadFile
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from deployments.bodylimit import FORM_ALLOWANCE, UploadBodyLimit
from pipeline.imageinfo import SNIFF_BYTES, ImageHeaderError, ImageKind, image_size, sniff_image_type

__all__ = [
    "CHUNK_BYTES",
    "FORM_ALLOWANCE",
    "ImageKind",
    "PreparedImage",
    "UploadBodyLimit",
    "UploadError",
    "UploadLimits",
    "fit_within",
    "image_size",
    "normalize_image",
    "prepare_upload",
    "read_upload",
    "sniff_image_type",
]

CHUNK_BYTES = 64 * 1024


class UploadLimits(BaseModel):
    """What one upload may be. `max_side` bounds what is stored and sent on, not what is
    accepted: a larger image is downscaled on ingest, so the reference it becomes stays within
    what image providers take as an edit/reference input:
    - OpenAI `images.edit` (API reference, `image` parameter): PNG/WEBP/JPEG files under 50 MB
      each for the GPT image models (25 MB in earlier versions of the reference); DALL-E 2 wants
      a square PNG under 4 MB. As a base64 data URL in a JSON body, `image_url` has
      maxLength 20971520 (20 MiB).
    - Gemini (Gemini API docs, "inline data"): a request with inline image data up to 20 MB in
      total; Google's developer blog ("Increased file size limits and expanded inputs support
      in Gemini API") raised it to 100 MB, base64-encoded.
    An RGB PNG of 2048x2048 is at most ~12.6 MB (incompressible noise), ~16.8 MB as base64;
    a photograph at 2048 px is a few MB (the benchmark's 2048x1280 one: 3 MB). So 2048 stays
    under every limit above except DALL-E 2's, which no current model needs.
    """

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="bytes of the image file")
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="width*height, checked from the header before decoding; above 2x PIL's "
        "MAX_IMAGE_PIXELS PIL itself refuses the image",
    )
    max_side: int = Field(
        2048,
        ge=64,
        description="longest side of the stored reference; a larger upload is downscaled to it "
        "and its original is kept as well",
    )


@dataclass(frozen=True)
class PreparedImage:
    """An accepted upload. `png` is what the pipeline stores and uses as scene 1; `original` is
    the upload exactly as received, only when it was downscaled (so it can be kept as an
    artifact too). Sizes are (width, height) as displayed, after EXIF orientation."""

    png: bytes
    original: bytes | None
    original_format: ImageKind
    size: tuple[int, int]
    original_size: tuple[int, int]
    downscaled: bool


class UploadError(Exception):
    """A rejected upload; `status_code` is the HTTP answer (413, 415 or 422)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


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
        if not sniffed and len(buffer) >= SNIFF_BYTES:
            _require_type(bytes(buffer[:SNIFF_BYTES]))
            sniffed = True
    if not buffer:
        raise UploadError(422, "image is empty")
    _require_type(bytes(buffer[:SNIFF_BYTES]))
    return bytes(buffer)


def normalize_image(data: bytes, limits: UploadLimits) -> PreparedImage:
    """Check and decode an image into what scene 1 uses: an 8-bit RGB PNG with exactly the
    upload's pixels when it fits `limits.max_side`, else a downscaled one (decoded at reduced
    scale where the format allows) plus the original bytes. CPU-bound: async callers use
    `prepare_upload` (or a worker thread)."""
    if not data:
        raise UploadError(422, "image is empty")
    if len(data) > limits.max_bytes:
        raise UploadError(413, f"image is larger than {limits.max_bytes} bytes")
    kind = _require_type(data[:SNIFF_BYTES])
    try:
        width, height = image_size(data)
    except ImageHeaderError:
        raise UploadError(422, f"image is not a decodable {kind}") from None
    if width * height > limits.max_pixels:
        raise UploadError(422, f"image has {width}x{height} pixels, more than {limits.max_pixels}")
    target = fit_within((width, height), limits.max_side)
    try:
        # Lazy: reads the header only. `formats` stops PIL from trying any other decoder.
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError:
        raise UploadError(422, f"image has too many pixels (limit {limits.max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UploadError(422, f"image is not a decodable {kind}") from None
    with image:
        try:
            rgb = _decode(image, target)
        except Image.DecompressionBombError:
            raise UploadError(422, f"image has too many pixels (limit {limits.max_pixels})") from None
        except (OSError, ValueError, SyntaxError, EOFError):
            raise UploadError(422, f"image is truncated or corrupt ({kind})") from None
    downscaled = target is not None
    turned = rgb.size != (target or (width, height))  # EXIF orientation swapped the sides
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return PreparedImage(
        png=out.getvalue(),
        original=data if downscaled else None,
        original_format=kind,
        size=rgb.size,
        original_size=(height, width) if turned else (width, height),
        downscaled=downscaled,
    )


async def prepare_upload(file: UploadFile, limits: UploadLimits) -> PreparedImage:
    """`read_upload` then `normalize_image` in a worker thread."""
    data = await read_upload(file, limits)
    return await anyio.to_thread.run_sync(normalize_image, data, limits)


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """The size that fits `max_side` with the aspect ratio kept, or None when `size` fits."""
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return None
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode(image: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Pixels as RGB, EXIF orientation applied; downscaled to `target` (in stored orientation)
    when given. Order matters for memory: a JPEG is decoded at the smallest DCT scale (1/2, 1/4
    or 1/8) that stays at least `target`, and everything else (colour conversion, the EXIF
    turn) happens on the small image, so the only full-size buffer is the decoded one."""
    if target is None:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    if image.format == "JPEG":
        image.draft(image.mode, target)
    image.load()
    source = image if image.mode in _RESAMPLED_AS_IS else _to_rgb(image)
    # reducing_gap: a cheap integer box reduction first, then Lanczos over the last 3x or more;
    # no visible difference from Lanczos over the whole range (Pillow's documentation).
    small = source.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return _to_rgb(ImageOps.exif_transpose(small))


# Modes Pillow resamples directly (RGBA and LA with premultiplied alpha); any other mode is
# converted to RGB first, at full size.
_RESAMPLED_AS_IS = frozenset({"RGB", "RGBA", "L", "LA"})


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
