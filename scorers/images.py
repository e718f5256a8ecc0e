"""Image intake: the one place where image bytes are decoded, checked and normalised.

Every path that receives image bytes calls this module: user uploads (`deployments.uploads`),
image-provider answers (`pipeline.runner._as_png`), scorer inputs (`open_image`, used by
`pipeline.ranking.decode_rgb` and `deployments.scorer`). One set of rules, in the order that
keeps a hostile input cheap:

1. byte size (`ImageLimits.max_bytes`), before anything is parsed;
2. format from the magic bytes (PNG, JPEG or WEBP; a filename or content type can say anything,
   and fewer decoders mean less attack surface; no provider answers anything else);
3. width and height from the header, through the format's own plugin class so no pixel is
   decoded: pixel count, smallest side and aspect ratio are checked here, so a 5 KB PNG that
   declares 6300x6300 never reaches a full decode unless the limits allow that many pixels;
4. animation: refused. A reference image must be one picture; taking the first frame of an APNG
   or animated WEBP silently would score, store or send on something the sender did not mean
   as "the" image (and APNG's first frame may be a fallback that is not part of the animation);
5. mode and bit depth: 1-bit, 8-bit and 16-bit greyscale, palette, RGB(A), CMYK and YCbCr are
   accepted; anything else is refused rather than guessed at;
6. decode, at reduced scale where the format allows (JPEG's DCT scaling) when `max_side` asks
   for a downscale, then EXIF orientation and conversion to 8-bit RGB: transparency composited
   onto white, 16-bit greyscale scaled (not clipped) to 8 bits.

`decode_tensor` is the same intake for the tensor input path: steps 1-5 as above on
the header, then torchvision's decoders into a uint8 (3, H, W) tensor with the same RGB meaning
(see its docstring for which inputs fall back to the PIL decode). torch is imported only there.

Lowest layer on purpose: Pillow and numpy only (torch lazily, for `decode_tensor`), no pipeline, deployments or web framework, so
`scorers` stays a plain library and the layers above import it.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

__all__ = [
    "MAX_ASPECT", "MAX_PIXELS", "MIN_SIDE", "PROVIDER_ANSWER", "SCORER_INPUT", "SNIFF_BYTES",
    "DecodedImage", "ImageError", "ImageHeader", "ImageLimits", "ImageTooLargeError", "UnsupportedImageError",
    "decode_image", "decode_tensor", "encode_png", "rgb_tensor", "fit_within", "image_size", "open_image", "read_header", "sniff_image_type",
    "to_png", "to_rgb",
]

MIN_SIDE = 16
"""Smaller images carry nothing to score and confuse channel inference in image processors (1x1x3)."""
MAX_PIXELS = 64_000_000
"""About 8000x8000: larger images are rejected before decoding (decompression bombs, memory)."""
MAX_ASPECT = 100
"""Qwen-VL's resizer refuses aspect ratios above 200; no scene reference is that thin."""
SNIFF_BYTES = 12
"""Enough leading bytes to tell PNG, JPEG and WEBP apart."""

FORMATS = ("PNG", "JPEG", "WEBP")

# The plugins' own classes, not `Image.open`: `open` refuses an image over twice Pillow's
# MAX_IMAGE_PIXELS before telling its size (a caller wants to say how big), tries every other
# decoder on unknown bytes, and would let the limits here depend on a process-global setting.
_READERS = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}

# Modes the three formats decode to that have a defined 8-bit RGB meaning here.
_ACCEPTED_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L", "I;16N"}
)
_HIGH_DEPTH = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Modes Pillow resamples directly (RGBA and LA with premultiplied alpha); others are brought to
# one of these first, at the decoded size.
_RESAMPLED_AS_IS = frozenset({"RGB", "RGBA", "L", "LA"})


class ImageError(ValueError):
    """An image that is refused: undecodable, too small, too large, animated or of an unusable kind."""


class ImageTooLargeError(ImageError):
    """More bytes than the limit allows (an upload answers 413 for it)."""


class UnsupportedImageError(ImageError):
    """Not a PNG, JPEG or WEBP by its magic bytes (an upload answers 415 for it)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one path accepts. Frozen and dependency-free so `scorers` can use it; the upload
    settings (`deployments.uploads.UploadLimits`, a pydantic model) map onto it.

    `max_side`: None decodes at full size; a number downscales anything longer to it (aspect kept).
    `min_side`, `max_aspect`: None turns the check off."""

    max_bytes: int | None = 64 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    min_side: int | None = MIN_SIDE
    max_aspect: float | None = MAX_ASPECT
    max_side: int | None = None


SCORER_INPUT = ImageLimits()
"""Scorer inputs: the models resize to a few hundred pixels anyway, so 64 M pixels is generous."""
PROVIDER_ANSWER = ImageLimits(max_pixels=40_000_000, min_side=None, max_aspect=None)
"""Image-provider answers: today's largest outputs are 4096x4096 (16.8 M pixels); a larger answer
is a broken or hostile endpoint. Small or thin images are kept (the scorers refuse them, naming
the image) so the trace shows what the provider sent."""

USER_UPLOAD = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000, min_side=None, max_aspect=None, max_side=2048)
"""A user's own image (HTTP upload or `sceneref generate --image`): the one set of defaults that
`deployments.uploads.UploadLimits` (the operator's settings) starts from and the CLI uses as is.
Any side length is accepted; a longer side is downscaled to 2048 px (why: UploadLimits)."""



@dataclass(frozen=True)
class ImageHeader:
    """Format and (width, height) as stored (before EXIF orientation), from the header only."""

    format: str
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, checked image. `image` is 8-bit RGB with EXIF orientation applied, downscaled
    when `limits.max_side` asked for it; `header` is the input as stored."""

    image: Image.Image
    header: ImageHeader
    downscaled: bool

    @property
    def format(self) -> str:
        return self.header.format


def sniff_image_type(head: bytes) -> str | None:
    """The format from the magic bytes, or None when it is none of PNG, JPEG, WEBP."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _require_format(data: bytes) -> str:
    if not data:
        raise ImageError("empty image data")
    kind = sniff_image_type(data[:SNIFF_BYTES])
    if kind is None:
        raise UnsupportedImageError("image must be PNG, JPEG or WEBP")
    return kind


_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error)


def _open(data: bytes, kind: str) -> Image.Image:
    """The format's plugin over the bytes: parses the header, decodes no pixel."""
    try:
        image = _READERS[kind](io.BytesIO(data))
    except _HEADER_ERRORS as exc:
        raise ImageError(f"unreadable {kind} header ({len(data)} bytes): {exc}") from exc
    if image.width <= 0 or image.height <= 0:
        image.close()
        raise ImageError(f"{kind} header says {image.width}x{image.height}")
    return image


def read_header(data: bytes) -> ImageHeader:
    """Format and size without decoding a pixel: safe and cheap on any input, bombs included."""
    kind = _require_format(data)
    with _open(data, kind) as image:
        return ImageHeader(kind, image.width, image.height)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as stored, from the header only."""
    return read_header(data).size


def _check_size(size: tuple[int, int], limits: ImageLimits = SCORER_INPUT) -> None:
    width, height = size
    if limits.min_side is not None and min(width, height) < limits.min_side:
        raise ImageError(
            f"image is {width}x{height} pixels; at least {limits.min_side}x{limits.min_side} is needed"
        )
    if width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted")
    if limits.max_aspect is not None and max(width, height) > limits.max_aspect * min(width, height):
        raise ImageError(f"image is {width}x{height} pixels; aspect ratios above {limits.max_aspect}:1 are rejected")


def fit_within(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size that fits `max_side` with the aspect ratio kept, or None when `size` fits."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open_checked(data: bytes, limits: ImageLimits) -> tuple[Image.Image, ImageHeader]:
    """Steps 1-5 of the intake (bytes, format, header size, animation, mode) on the header only;
    the open plugin is returned, not yet decoded. Shared by the PIL and tensor decoders so both
    refuse exactly the same inputs."""
    if limits.max_bytes is not None and len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image is larger than {limits.max_bytes} bytes")
    kind = _require_format(data)
    image = _open(data, kind)
    try:
        header = ImageHeader(kind, image.width, image.height)
        _check_size(header.size, limits)
        if getattr(image, "n_frames", 1) > 1:
            raise ImageError(f"animated {kind} ({image.n_frames} frames): a reference image must be a still image")
        if image.mode not in _ACCEPTED_MODES:
            raise ImageError(f"{kind} in mode {image.mode} is not supported")
    except BaseException:
        image.close()
        raise
    return image, header


def decode_image(data: bytes, limits: ImageLimits = SCORER_INPUT) -> DecodedImage:
    """Check `data` against `limits` (bytes, format, header size, animation, mode) and decode it
    to 8-bit RGB, downscaled to `limits.max_side` when given. Raises ImageError (or its
    subclasses ImageTooLargeError, UnsupportedImageError) and nothing else on bad input."""
    image, header = _open_checked(data, limits)
    kind = header.format
    with image:
        target = fit_within(header.size, limits.max_side)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                rgb = _decode(image, target)
        except ImageError:
            raise
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, EOFError, ...)
            raise ImageError(f"cannot decode {kind} image ({len(data)} bytes, truncated or corrupt): {exc}") from exc
    return DecodedImage(rgb, header, downscaled=target is not None)


def _decode(image: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Pixels as RGB, EXIF orientation applied; downscaled to `target` (in stored orientation).
    Memory: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that stays at least
    `target`, and conversions before the resize keep one byte per pixel for 1-bit and 16-bit
    greyscale, so the decoded buffer is the only large one."""
    if target is None:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image), checked=False)
    if image.format == "JPEG":
        image.draft(image.mode, target)
    image.load()
    if image.mode in _RESAMPLED_AS_IS:
        source = image
    elif image.mode == "1" or image.mode in _HIGH_DEPTH:
        source = _to_grey(image)
    else:
        source = to_rgb(image, checked=False)
    # reducing_gap: a cheap integer box reduction first, then Lanczos over the last 3x or more;
    # no visible difference from Lanczos over the whole range (Pillow's documentation).
    small = source.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return to_rgb(ImageOps.exif_transpose(small), checked=False)


def open_image(data: bytes, limits: ImageLimits = SCORER_INPUT) -> Image.Image:
    """Decode image bytes (PNG, JPEG, WEBP) into an 8-bit RGB PIL image, checking size before decoding pixels."""
    return decode_image(data, limits).image


# (format, mode) pairs that torchvision decodes to the same RGB meaning as `to_rgb`: 8-bit RGB
# and greyscale as they are, palettes expanded, alpha composited onto white below. Everything
# else (1-bit, 16-bit, CMYK/YCbCr JPEG, premultiplied modes) takes the PIL decode.
_TENSOR_MODES = {
    "PNG": frozenset({"RGB", "RGBA", "L", "LA", "P"}),
    "JPEG": frozenset({"RGB", "L"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
_ALPHA_MODES = frozenset({"RGBA", "LA"})


def decode_tensor(data: bytes, limits: ImageLimits = SCORER_INPUT):
    """Decode image bytes into a uint8 RGB tensor of shape (3, H, W) on the CPU, for scorers that
    resize on their device (`ScoringSettings.input_path="tensor"`).

    The same checks as `open_image`, from the header, before any pixel is decoded (byte size,
    format, pixel limit, aspect, animation, mode), with the same ImageError types. Decoded with
    torchvision.io where its result equals `open_image`'s pixel for pixel: PNG RGB/RGBA/L/LA/
    palette (with or without tRNS), JPEG RGB/L, WEBP RGB/RGBA; alpha is composited onto white
    with Pillow's own integer rule. Everything else goes through `open_image` and is converted,
    so the meaning is still `to_rgb`'s: 1-bit and 16-bit images, CMYK/YCbCr JPEG, a non-palette
    image with a transparency key, an EXIF or XMP orientation to apply, a `limits.max_side`
    downscale, and a 16-bit PNG in an RGB mode (found after the decode)."""
    image, header = _open_checked(data, limits)
    with image:
        fast = (
            image.mode in _TENSOR_MODES[header.format]
            and fit_within(header.size, limits.max_side) is None
            and ("transparency" not in image.info or image.mode == "P")
            and not _may_be_oriented(image.info)
        )
        alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    if not fast:
        return rgb_tensor(open_image(data, limits))
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    try:
        pixels = tv_decode(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.RGB_ALPHA if alpha else ImageReadMode.RGB,
        )
    except RuntimeError as exc:
        kind = header.format
        raise ImageError(f"cannot decode {kind} image ({len(data)} bytes, truncated or corrupt): {exc}") from exc
    if pixels.dtype != torch.uint8:  # a 16-bit PNG: Pillow keeps the high byte; its decode is the rule
        return rgb_tensor(open_image(data, limits))
    if tuple(pixels.shape[-2:]) != (header.height, header.width):
        raise ImageError(f"{header.format} decoded to {tuple(pixels.shape)}, header says {header.width}x{header.height}")
    return _on_white(pixels) if alpha else pixels


def _may_be_oriented(info: dict) -> bool:
    """An orientation `exif_transpose` would apply, read from what the header gave (a PNG eXIf
    chunk after the pixel data is not seen here: the PNG specification puts it before)."""
    if "exif" in info:
        exif = Image.Exif()
        try:
            exif.load(info["exif"])
        except Exception:
            return True
        if exif.get(0x0112, 1) != 1:
            return True
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if xmp:
        return b"Orientation" in (xmp if isinstance(xmp, bytes) else str(xmp).encode())
    return False


def _on_white(rgba):
    """RGBA (4, H, W) uint8 composited onto opaque white with Pillow's `alpha_composite`
    arithmetic (7-bit fixed point, its divide-by-255 shift), so the result is bit-identical to
    `to_rgb`; a fully transparent pixel is white."""
    import torch

    wide = rgba.to(torch.int32)
    rgb, a = wide[:3], wide[3:]
    mixed = rgb * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7)
    out = ((((mixed >> 8) + mixed) >> 8) >> 7)
    return torch.where(a == 0, torch.full_like(out, 255), out).to(torch.uint8)


def rgb_tensor(image: Image.Image):
    """An image as a uint8 RGB (3, H, W) CPU tensor, through `to_rgb` (so any mode means what
    it means on the PIL path)."""
    import torch

    rgb = to_rgb(image, checked=False)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def to_png(data: bytes, limits: ImageLimits = PROVIDER_ANSWER) -> bytes:
    """PNG bytes for image bytes that pass `limits`. A PNG that needs no downscale comes back
    byte for byte (the stored image is exactly what was sent, alpha and all) after a full
    decode proves it whole; JPEG and WEBP become 8-bit RGB PNGs (alpha onto white)."""
    decoded = decode_image(data, limits)
    if decoded.format == "PNG" and not decoded.downscaled:
        return data
    return encode_png(decoded.image)


def to_rgb(image: Image.Image, *, checked: bool = True) -> Image.Image:
    """8-bit RGB copy of image.

    Transparency is composited onto white (as transformers' convert_rgb does for the CLIP and Qwen processors),
    16-bit and 32-bit integer greyscale is scaled to 8 bits (PIL's own convert would clip it to white),
    palette, greyscale, CMYK and other modes go through PIL's convert. `checked` applies the
    scorer-input size limits (for PIL images handed to a scorer directly).
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(image).__name__}")
    if checked:
        _check_size(image.size)
    try:
        if image.mode == "RGB":
            return image
        if image.mode in _HIGH_DEPTH:
            return _to_grey(image).convert("RGB")
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


def _to_grey(image: Image.Image) -> Image.Image:
    """8-bit greyscale ("L") of a 1-bit or high-depth image. 16-bit modes use the full 0-65535
    range; 32-bit "I" (how PIL often opens 16-bit PNGs) only when above 255; float in 0-1 is
    scaled by 255."""
    if image.mode in ("1", "L"):
        return image.convert("L")
    array = np.asarray(image)
    if array.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
        eight = np.nan_to_num(array.astype(np.float32)) * scale
    elif image.mode.startswith("I;16") or array.max(initial=0) > 255:
        eight = array.astype(np.float32) / 257.0
    else:
        eight = array
    return Image.fromarray(np.clip(np.round(eight), 0, 255).astype(np.uint8), "L")
