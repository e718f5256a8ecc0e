"""Checks for a user's reference image, in the order that keeps a hostile upload cheap: the
request body's size while it streams in (`deployments.bodylimit`, before Starlette parses the form),
the file's size while reading (never more than the limit in memory), type from the magic bytes
(not the filename or the client's content type), pixel count from the header (before any pixel
is decoded), and only then a decode into a plain RGB PNG: at full size for an image that fits
`max_side`, else at reduced scale where the format allows it (JPEG) and downscaled.

The re-encoded PNG is what the pipeline stores and sends to image providers: one colour model
for every upload, EXIF orientation applied, metadata (EXIF, GPS) dropped, and never larger than
a provider's edit call accepts.

Everything after reading the bytes (type, header, pixel count, animation, mode, decode,
downscale, colour model) is the one image intake, `scorers.images`, which provider answers and
scorer inputs go through as well; this module keeps the HTTP side (streaming, status codes) and
the upload settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import anyio
from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from scorers.images import (
    SNIFF_BYTES,
    USER_UPLOAD,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    encode_png,
    fit_within,
    image_size,
    sniff_image_type,
)

ImageKind = Literal["PNG", "JPEG", "WEBP"]

__all__ = [
    "CHUNK_BYTES",
    "ImageKind",
    "PreparedImage",
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

    max_bytes: int = Field(USER_UPLOAD.max_bytes, gt=0, description="bytes of the image file")
    max_pixels: int = Field(
        USER_UPLOAD.max_pixels,
        gt=0,
        description="width*height, checked from the header before decoding; above 2x PIL's "
        "MAX_IMAGE_PIXELS PIL itself refuses the image",
    )
    max_side: int = Field(
        USER_UPLOAD.max_side,
        ge=64,
        description="longest side of the stored reference; a larger upload is downscaled to it "
        "and its original is kept as well",
    )

    def intake(self) -> ImageLimits:
        """These limits as the shared image intake's: any size of side is accepted (small
        references are the user's choice; the scorers never see scene 1), larger ones are
        downscaled to `max_side`."""
        return ImageLimits(
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            min_side=None,
            max_aspect=None,
            max_side=self.max_side,
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
    scale where the format allows) plus the original bytes. The checks and the decode are the
    one image intake's (`scorers.images.decode_image`); this maps its refusals to HTTP answers
    (413 too many bytes, 415 not PNG/JPEG/WEBP, 422 anything else: pixel bomb, animation,
    corrupt data). CPU-bound: async callers use `prepare_upload` (or a worker thread)."""
    try:
        decoded = decode_image(data, limits.intake())
    except ImageTooLargeError as exc:
        raise UploadError(413, str(exc)) from None
    except UnsupportedImageError as exc:
        raise UploadError(415, str(exc)) from None
    except ImageError as exc:
        raise UploadError(422, str(exc) if data else "image is empty") from None
    rgb, header = decoded.image, decoded.header
    width, height = header.size
    turned = rgb.size != (fit_within(header.size, limits.max_side) or header.size)  # EXIF turned it
    return PreparedImage(
        png=encode_png(rgb),
        original=data if decoded.downscaled else None,
        original_format=header.format,
        size=rgb.size,
        original_size=(height, width) if turned else (width, height),
        downscaled=decoded.downscaled,
    )


async def prepare_upload(file: UploadFile, limits: UploadLimits) -> PreparedImage:
    """`read_upload` then `normalize_image` in a worker thread."""
    data = await read_upload(file, limits)
    return await anyio.to_thread.run_sync(normalize_image, data, limits)
