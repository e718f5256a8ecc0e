"""Every path that receives image bytes goes through scorers.images, with the same rules.

Before the one intake, images were decoded in six places with different safety rules: the runner's
`_as_png` and `pipeline.ranking.decode_rgb` had no pixel limit and no animation rule, the scorer
deployment decoded with a bare `Image.open`, and the runner dropped alpha where uploads and
scorers composite it onto white. These tests hold each path to the one module's rules.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from deployments.scorer import TextImage
from deployments.uploads import UploadLimits, normalize_image
from pipeline.runner import _as_png
from pipeline.ranking import decode_rgb
from scorers.images import ImageError

ROOT = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def one_bit_png(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG whose pixels are all zero: a few KB on disk, width*height bytes decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


class RecordingModel:
    """Stands in for a scorer model: records what reached it."""

    def __init__(self):
        self.calls = []

    def score(self, images, prompts):
        self.calls.append(images)
        return []


def scorer_replica():
    """The deployment's class without Ray or weights: only its decoding is under test."""
    from deployments.scorer import ScorerDeployment

    replica = object.__new__(ScorerDeployment.func_or_class)
    replica.model = RecordingModel()
    return replica


def test_the_5kb_6300_square_one_bit_png_is_downscaled_on_upload():
    data = one_bit_png(6300, 6300)
    assert len(data) < 6 * 1024
    limits = UploadLimits()
    prepared = normalize_image(data, limits)
    assert prepared.downscaled and prepared.original_size == (6300, 6300)
    assert max(prepared.size) == limits.max_side
    with Image.open(io.BytesIO(prepared.png)) as stored:
        assert stored.size == (limits.max_side, limits.max_side) and stored.mode == "RGB"


def test_provider_answers_have_a_pixel_limit():
    """Before: `_as_png` decoded any PNG at full size (8000x8000 is under Pillow's own bomb limit)."""
    with pytest.raises(ImageError, match="8000x8000"):
        _as_png(one_bit_png(8000, 8000))


def test_scoring_decode_has_a_pixel_limit():
    """Before: `decode_rgb` decoded 9000x9000 (81 M pixels, under Pillow's 2x89 M error) in full."""
    with pytest.raises(ImageError, match="9000x9000"):
        decode_rgb(one_bit_png(9000, 9000))


def test_the_scorer_deployment_refuses_a_bomb_before_decoding_it():
    """Before: the replica ran `Image.open(...).convert("RGB")` on whatever arrived."""
    replica = scorer_replica()
    with pytest.raises(ImageError, match="9000x9000"):
        replica._score([TextImage(one_bit_png(9000, 9000), "a prompt")])
    assert replica.model.calls == []


def test_the_scorer_deployment_names_an_input_from_its_header_only():
    from deployments.scorer import describe_request

    assert "PNG 9000x9000" in describe_request(TextImage(one_bit_png(9000, 9000), "p"))
    assert "not a readable image" in describe_request(TextImage(b"garbage", "p"))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_are_refused_on_every_path(fmt):
    """Decision: refused, not first frame only (see scorers/images.py). Before: every path took frame 1."""
    data = animated(fmt)
    with pytest.raises(ImageError, match="animated"):
        _as_png(data)
    with pytest.raises(ImageError, match="animated"):
        decode_rgb(data)
    with pytest.raises(ImageError, match="animated"):
        scorer_replica()._score([TextImage(data, "p")])
    from deployments.uploads import UploadError

    with pytest.raises(UploadError, match="animated") as info:
        normalize_image(data, UploadLimits())
    assert info.value.status_code == 422


def test_provider_answers_flatten_alpha_like_uploads_and_scorers():
    """Before: the runner's `_as_png` dropped alpha, exposing the colour under transparent pixels."""
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    data = encode(image, "WEBP", lossless=True)
    with Image.open(io.BytesIO(_as_png(data))) as provider:
        assert provider.convert("RGB").getpixel((3, 3)) == (255, 255, 255)
    with Image.open(io.BytesIO(normalize_image(data, UploadLimits()).png)) as upload:
        assert upload.getpixel((3, 3)) == (255, 255, 255)
    assert decode_rgb(data).getpixel((3, 3)) == (255, 255, 255)


def test_provider_pngs_are_kept_byte_for_byte():
    data = encode(Image.new("RGBA", (40, 30), (10, 20, 30, 128)))
    assert _as_png(data) == data


def test_undecodable_provider_answers_are_image_errors():
    data = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    for bad in (b"", b"not an image at all", data[: len(data) // 3]):
        with pytest.raises(ImageError):
            _as_png(bad)


def test_only_the_intake_module_opens_images():
    """No product module but scorers/images.py opens image bytes itself. Before: the offline
    renderer opened the reference with a bare `Image.open`."""
    product = [p for package in ("pipeline", "scorers", "deployments") for p in (ROOT / package).rglob("*.py")]
    offenders = [
        str(p.relative_to(ROOT)) for p in product
        if p.name != "images.py" or p.parent.name != "scorers"
        if re.search(r"Image\.open\(|ImageFile\(|imdecode", p.read_text())
    ]
    assert product and offenders == []


def test_the_offline_renderer_takes_its_reference_through_the_intake():
    """A chained scene's reference obeys the provider rules: an animated or bomb-sized reference is
    a provider error that names the problem, not a frame-1 guess or a full decode."""
    import asyncio

    from pipeline.providers.offline import OfflineImages
    from pipeline.providers.base import ProviderError
    from pipeline.settings import ImageSettings

    images = OfflineImages(ImageSettings(provider="offline", size="96x64"))
    with pytest.raises(ProviderError, match="animated"):
        asyncio.run(images.generate("a cup", reference=animated("PNG"), variation=0))
    with pytest.raises(ProviderError, match="8000x8000"):
        asyncio.run(images.generate("a cup", reference=one_bit_png(8000, 8000), variation=0))
    rgba = encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0)))
    assert asyncio.run(images.generate("a cup", reference=rgba, variation=0)).data[:8] == b"\x89PNG\r\n\x1a\n"
