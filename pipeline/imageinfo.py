"""What an image is and how big it is, from its first bytes and its header only.

Shared by the upload checks (which must refuse a pixel bomb before decoding a single pixel) and
by anything else that handles image bytes (the runner, the CLI): nothing here decodes pixels,
so it is cheap on any input, hostile or not. Pillow only, no web framework.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin

ImageKind = Literal["PNG", "JPEG", "WEBP"]

SNIFF_BYTES = 12

# The plugins' own classes, not `Image.open`: `open` refuses an image over twice Pillow's
# MAX_IMAGE_PIXELS before telling its size, and a caller that refuses bombs wants to say how big.
_HEADER_READERS = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


class ImageHeaderError(ValueError):
    """The bytes are not a PNG, JPEG or WEBP image, or its header cannot be read."""


def sniff_image_type(head: bytes) -> ImageKind | None:
    """The format from the magic bytes: a filename or a client's content type can say anything."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as stored (before any EXIF orientation), read from the header only: no
    pixel is decoded, so this is safe on a decompression bomb and reports its real size."""
    kind = sniff_image_type(data[:SNIFF_BYTES])
    if kind is None:
        raise ImageHeaderError("not a PNG, JPEG or WEBP image")
    try:
        with _HEADER_READERS[kind](io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise ImageHeaderError(f"unreadable {kind} header") from exc
    if width <= 0 or height <= 0:
        raise ImageHeaderError(f"{kind} header says {width}x{height}")
    return width, height
