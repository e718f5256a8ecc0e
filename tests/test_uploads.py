"""Upload checks: size while reading, magic bytes, pixel bombs, normalisation to RGB PNG."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from fastapi import UploadFile
from PIL import Image

from scorers.images import ImageError

from deployments.uploads import (
    CHUNK_BYTES,
    PreparedImage,
    UploadError,
    UploadLimits,
    image_size,
    normalize_image,
    prepare_upload,
    read_upload,
    sniff_image_type,
)

LIMITS = UploadLimits()


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def decoded(prepared: PreparedImage) -> Image.Image:
    image = Image.open(io.BytesIO(prepared.png))
    assert image.format == "PNG"
    image.load()
    assert image.size == prepared.size
    return image


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG whose pixels are all zero: huge when decoded, tiny on disk."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def upload(data: bytes, name: str = "image.png", *, size: bool = True) -> UploadFile:
    return UploadFile(file=io.BytesIO(data), filename=name, size=len(data) if size else None)


def status_of(call, *args) -> int:
    with pytest.raises(UploadError) as info:
        call(*args)
    return info.value.status_code


# --- size and type --------------------------------------------------------------------


async def test_read_upload_returns_bytes():
    data = encode(Image.new("RGB", (8, 8), "red"))
    assert await read_upload(upload(data), LIMITS) == data


async def test_too_big_declared_and_streamed():
    limits = UploadLimits(max_bytes=1000)
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    assert len(data) > 1000
    for declared in (True, False):
        with pytest.raises(UploadError) as info:
            await read_upload(upload(data, size=declared), limits)
        assert info.value.status_code == 413


async def test_unbounded_stream_stops_at_limit():
    class Endless(io.RawIOBase):
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            head = b"\x89PNG\r\n\x1a\n" if self.served == 0 else b""
            data = (head + b"\x00" * len(buffer))[: len(buffer)]
            buffer[: len(data)] = data
            self.served += len(data)
            return len(data)

    stream = Endless()
    limits = UploadLimits(max_bytes=256 * 1024)
    with pytest.raises(UploadError) as info:
        await read_upload(UploadFile(file=stream, filename="x.png"), limits)
    assert info.value.status_code == 413
    assert stream.served <= limits.max_bytes + CHUNK_BYTES


async def test_wrong_type_rejected_by_content():
    gif = encode(Image.new("P", (8, 8)), "GIF")
    text = b"this is plain text, whatever its name says" * 10
    for data in (gif, text, encode(Image.new("RGB", (8, 8)), "BMP")):
        with pytest.raises(UploadError) as info:
            await read_upload(upload(data, name="photo.png"), LIMITS)
        assert info.value.status_code == 415
        assert status_of(normalize_image, data, LIMITS) == 415


async def test_empty_and_tiny_files():
    with pytest.raises(UploadError) as info:
        await read_upload(upload(b""), LIMITS)
    assert info.value.status_code == 422
    with pytest.raises(UploadError) as info:
        await read_upload(upload(b"\x89PNG"), LIMITS)
    assert info.value.status_code == 415
    assert status_of(normalize_image, b"", LIMITS) == 422


def test_sniff():
    assert sniff_image_type(encode(Image.new("RGB", (4, 4)), "PNG")) == "PNG"
    assert sniff_image_type(encode(Image.new("RGB", (4, 4)), "JPEG")) == "JPEG"
    assert sniff_image_type(encode(Image.new("RGB", (4, 4)), "WEBP")) == "WEBP"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None


# --- undecodable and bombs ------------------------------------------------------------


def test_truncated_png():
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"))
    assert status_of(normalize_image, data[: len(data) // 2], LIMITS) == 422
    assert status_of(normalize_image, data[:40], LIMITS) == 422


def test_corrupt_jpeg_and_webp():
    assert status_of(normalize_image, b"\xff\xd8\xff" + b"\x00" * 100, LIMITS) == 422
    assert status_of(normalize_image, b"RIFF\x10\x00\x00\x00WEBPVP8 garbage", LIMITS) == 422


def test_decompression_bomb_png():
    bomb = bomb_png(20000, 20000)  # 400 megapixels in well under 100 KB
    assert len(bomb) < 100_000
    assert status_of(normalize_image, bomb, LIMITS) == 422


def test_pixel_limit_below_pil_guard():
    data = bomb_png(8000, 6000)  # 48 MP: over our 40 MP default, under PIL's own guard
    with pytest.raises(UploadError) as info:
        normalize_image(data, LIMITS)
    assert info.value.status_code == 422 and "8000x6000" in info.value.detail
    assert decoded(normalize_image(bomb_png(64, 32), LIMITS)).size == (64, 32)


# --- normalisation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGB", (6, 4), (10, 200, 30)), (10, 200, 30)),
        (Image.new("L", (6, 4), 128), (128, 128, 128)),
        (Image.new("1", (6, 4), 1), (255, 255, 255)),
        (Image.new("I;16", (6, 4), 0x8080), (128, 128, 128)),
        (Image.new("RGBA", (6, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("RGBA", (6, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("LA", (6, 4), (0, 0)), (255, 255, 255)),
    ],
    ids=["rgb", "grey", "1bit", "16bit", "rgba-opaque", "rgba-transparent", "la-transparent"],
)
def test_modes_normalised_to_rgb(image, expected):
    result = decoded(normalize_image(encode(image), LIMITS))
    assert result.mode == "RGB" and result.size == (6, 4)
    assert result.getpixel((0, 0)) == expected


def test_palette_with_transparency():
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    data = encode(palette, transparency=0)
    result = decoded(normalize_image(data, LIMITS))
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (0, 0, 255)


def test_16bit_rgb_png():
    """A 48-bit RGB PNG, written by hand since PIL cannot save one."""
    width, height = 3, 2
    raw = b"".join(b"\x00" + struct.pack(">HHH", 0xFFFF, 0x8000, 0x0000) * width for _ in range(height))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    result = decoded(normalize_image(data, LIMITS))
    assert result.mode == "RGB" and result.getpixel((0, 0)) == (255, 128, 0)


def test_jpeg_cmyk_and_webp_rgba():
    cmyk = decoded(normalize_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), LIMITS))
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((0, 0))) > 240
    webp = decoded(normalize_image(encode(Image.new("RGBA", (8, 8), (0, 0, 255, 255)), "WEBP", lossless=True), LIMITS))
    assert webp.mode == "RGB" and webp.getpixel((0, 0)) == (0, 0, 255)


def test_exif_orientation_applied_and_metadata_dropped():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    result = decoded(normalize_image(data, LIMITS))
    assert result.size == (20, 40)
    top, bottom = result.getpixel((10, 5)), result.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert 0x0112 not in result.getexif()


async def test_prepare_upload_end_to_end():
    data = encode(Image.new("P", (10, 10), 3), "PNG")
    result = decoded(await prepare_upload(upload(data, name="anything.bin"), LIMITS))
    assert result.mode == "RGB" and result.size == (10, 10)


# --- the stored size: exact pixels within max_side, cheap downscale above it ----------------


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.effect_noise(size, 80).convert(mode)


@pytest.mark.parametrize("fmt, params", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_within_max_side_keeps_every_pixel(fmt, params):
    limits = UploadLimits(max_side=256)
    for size in [(256, 100), (100, 256), (173, 91)]:
        image = noise(size)
        prepared = normalize_image(encode(image, fmt, **params), limits)
        assert not prepared.downscaled and prepared.original is None
        assert prepared.size == prepared.original_size == size
        assert prepared.original_format == fmt
        assert decoded(prepared).tobytes() == image.tobytes()


@pytest.mark.parametrize(
    "fmt, mode",
    [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"),
     ("JPEG", "L"), ("JPEG", "CMYK"), ("WEBP", "RGB")],
)
def test_larger_image_fits_max_side_with_aspect_and_original(fmt, mode):
    limits = UploadLimits(max_side=256)
    image = Image.new("RGB", (1200, 500), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 600, 500))  # left half red
    image = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    data = encode(image, fmt)
    prepared = normalize_image(data, limits)
    assert prepared.downscaled and prepared.original == data and prepared.original_format == fmt
    assert prepared.original_size == (1200, 500)
    assert prepared.size == (256, 107)  # 500 * 256 / 1200 = 106.7
    result = decoded(prepared)
    assert result.mode == "RGB"
    if mode in ("RGB", "RGBA", "P", "CMYK"):
        left, right = result.getpixel((30, 50)), result.getpixel((220, 50))
        assert left[0] > 200 and left[2] < 60, left
        assert right[2] > 200 and right[0] < 60, right


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch):
    """`draft` makes libjpeg decode at 1/2, 1/4 or 1/8 scale: the full-size pixels never exist."""
    from PIL import JpegImagePlugin

    decoded_sizes = []
    load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded_sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    data = encode(noise((2000, 1000)), "JPEG", quality=90)
    prepared = normalize_image(data, UploadLimits(max_side=256))
    # 2000/256 = 7.8: the largest DCT scale that stays >= the target is 1/4.
    assert set(decoded_sizes) == {(500, 250)}
    assert prepared.size == (256, 128) and prepared.original_size == (2000, 1000)

    decoded_sizes.clear()
    small = normalize_image(encode(noise((200, 100)), "JPEG"), UploadLimits(max_side=256))
    assert set(decoded_sizes) == {(200, 100)} and not small.downscaled  # within max_side: full scale


def test_downscale_applies_exif_orientation():
    image = Image.new("RGB", (800, 400), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 400, 400))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    prepared = normalize_image(data, UploadLimits(max_side=200))
    assert prepared.size == (100, 200) and prepared.original_size == (400, 800)
    result = decoded(prepared)
    top, bottom = result.getpixel((50, 20)), result.getpixel((50, 180))
    assert top[0] > 200 and top[2] < 60, top  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert 0x0112 not in result.getexif()


def test_default_max_side_keeps_png_under_provider_limits():
    """Worst case for PNG (incompressible noise) at the default 2048 px: under OpenAI's 20 MiB
    data-URL limit once base64-encoded, and so under the 50 MB file and Gemini inline limits."""
    limits = UploadLimits()
    data = encode(noise((3000, 1000)), "PNG", compress_level=1)
    prepared = normalize_image(data, limits)
    assert prepared.size == (2048, 683) and prepared.downscaled
    assert 2048 * 2048 * 3 * 4 / 3 < 20 * 2**20  # the bound the docstring gives, checked


def test_bombs_refused_from_the_header_without_decoding(monkeypatch):
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for width, height in [(20000, 20000), (8000, 6000)]:  # over PIL's own guard; over ours only
        with pytest.raises(UploadError) as info:
            normalize_image(bomb_png(width, height), LIMITS)
        assert info.value.status_code == 422 and f"{width}x{height}" in info.value.detail


def test_image_size_reads_the_header_only():
    assert image_size(bomb_png(20000, 20000)) == (20000, 20000)
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert image_size(encode(Image.new("RGB", (33, 17)), fmt)) == (33, 17)
    for bad in (b"", b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"x" * 20, b"\xff\xd8\xff" + b"\x00" * 100):
        with pytest.raises(ImageError):
            image_size(bad)
