"""open_image / to_rgb: every image kind is converted to 8-bit RGB or rejected with ImageError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from scorers import ImageError, open_image, to_rgb
from scorers.images import MAX_PIXELS


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (no pixel data): enough to test the size check before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_rgb_roundtrip():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    out = open_image(encode(image))
    assert out.mode == "RGB" and out.size == (40, 30) and out.getpixel((5, 5)) == (10, 200, 30)


def test_jpeg_and_cmyk():
    assert open_image(encode(Image.new("RGB", (32, 32), "red"), "JPEG")).mode == "RGB"
    assert open_image(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")).mode == "RGB"


def test_rgba_composited_on_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))
    out = open_image(encode(image))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_and_without_transparency():
    plain = Image.new("RGB", (32, 32), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert open_image(encode(plain)).getpixel((1, 1)) == (0, 128, 0)
    transparent = Image.new("P", (32, 32), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.info["transparency"] = 0
    assert open_image(encode(transparent, transparency=0)).getpixel((1, 1)) == (255, 255, 255)


def test_greyscale_and_greyscale_alpha():
    assert open_image(encode(Image.new("L", (32, 32), 77))).getpixel((0, 0)) == (77, 77, 77)
    assert open_image(encode(Image.new("LA", (32, 32), (77, 255)))).getpixel((0, 0)) == (77, 77, 77)
    assert open_image(encode(Image.new("1", (32, 32), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    array = np.full((32, 32), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    out = open_image(encode(Image.fromarray(array)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(array).convert("I")).getpixel((0, 0)) == (128, 128, 128)


def test_float_image():
    assert to_rgb(Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32))).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("size", [(1, 1), (1, 100), (15, 40)])
def test_too_small_rejected(size):
    with pytest.raises(ImageError, match=r"\d+x\d+ pixels; at least"):
        open_image(encode(Image.new("RGB", size)))
    with pytest.raises(ImageError):
        to_rgb(Image.new("RGB", size))


@pytest.mark.parametrize("size", [(9000, 8000), (20000, 20000)])
def test_very_large_rejected_before_decoding(size):
    assert size[0] * size[1] > MAX_PIXELS
    with pytest.raises(ImageError, match="at most|too large"):
        open_image(png_header_only(*size))


def test_extreme_aspect_ratio_rejected():
    with pytest.raises(ImageError, match="aspect"):
        open_image(encode(Image.new("L", (16 * 101, 16))))


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_undecodable_rejected(data):
    with pytest.raises(ImageError):
        open_image(data)


def test_truncated_file_rejected():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(data[: len(data) // 2])


def test_not_an_image_object():
    with pytest.raises(ImageError, match="PIL image"):
        to_rgb(np.zeros((32, 32, 3), dtype=np.uint8))


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


# --- one intake for every path ----------------------------------------------------------

from scorers.images import ImageLimits, UnsupportedImageError, decode_image, read_header  # noqa: E402


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_only_png_jpeg_webp_are_decoded(fmt):
    """Before: any format Pillow knows was decoded. Providers answer PNG, JPEG or WEBP only,
    and fewer decoders mean less attack surface."""
    with pytest.raises(UnsupportedImageError):
        open_image(encode(Image.new("RGB", (32, 32), "red"), fmt))


def test_animated_png_refused():
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    with pytest.raises(ImageError, match="animated PNG \\(2 frames\\)"):
        open_image(encode(frames[0], save_all=True, append_images=frames[1:]))


def test_sixteen_bit_grey_downscaled_keeps_its_levels():
    array = np.full((64, 96), 32768, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(array)), ImageLimits(max_side=48))
    assert decoded.downscaled and decoded.image.size == (48, 32)
    assert decoded.image.mode == "RGB" and decoded.image.getpixel((5, 5)) == (128, 128, 128)


def test_one_bit_downscale_is_greyscale_not_nearest():
    """A 1-bit checkerboard downscaled 2x becomes mid grey (Lanczos over 8-bit grey), not a
    nearest-neighbour pick of black or white."""
    board = Image.fromarray((np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)).convert("1")
    decoded = decode_image(encode(board), ImageLimits(max_side=32))
    assert 100 < decoded.image.getpixel((10, 10))[0] < 156


def test_header_read_never_decodes():
    header = read_header(png_header_only(20000, 20000))
    assert (header.format, header.size) == ("PNG", (20000, 20000))


def test_byte_limit_before_anything_else():
    with pytest.raises(ImageError, match="larger than 10 bytes"):
        decode_image(b"x" * 11, ImageLimits(max_bytes=10))
