"""The tensor input path (scoring throughput): decode_tensor against open_image, each scorer's tensor path
against its PIL path, the PIL path pinned, bad tensors refused, the input_path setting."""

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from benchmarks.input_path import compare, photo_like, pil_pixels, provider_images
from pipeline.schemas import ScorerResult
from pipeline.ranking import LocalConsistency, LocalScoring, decode_input
from pipeline.settings import ScoringSettings
from scorers.images import (
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_tensor,
    open_image,
    rgb_tensor,
)

TEXT_SCORERS = ("pickscore", "clipscore", "vqascore", "aesthetic")
# The documented tolerance of the tensor path (docs/scoring.md, "Input path"): preprocessed pixels
# within 0.04 normalised units (about 2 uint8 levels) anywhere and 0.0005 on average; on the tiny
# models a score within 0.05 points of 100.
PIXEL_MAX, PIXEL_MEAN, SCORE_DIFF = 0.04, 0.0005, 0.05


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def noisy(size=(70, 50), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(9).integers(0, 256, image.size[::-1], dtype=np.uint8)))
    return rgba


def grey_alpha() -> Image.Image:
    la = noisy().convert("L").convert("LA")
    la.putalpha(Image.fromarray((np.arange(50 * 70).reshape(50, 70) % 256).astype(np.uint8)))
    return la


KINDS = {
    "png-rgb": lambda: encode(noisy()),
    "png-rgba-on-white": lambda: encode(with_alpha(noisy())),
    "png-palette": lambda: encode(noisy().convert("P", palette=Image.Palette.ADAPTIVE)),
    "png-palette-transparent": lambda: encode(noisy().convert("P", palette=Image.Palette.ADAPTIVE), transparency=5),
    "png-grey": lambda: encode(noisy().convert("L")),
    "png-grey-alpha": lambda: encode(grey_alpha()),
    "png-1bit": lambda: encode(noisy().convert("1")),
    "png-16bit-grey": lambda: encode(Image.fromarray(np.random.default_rng(1).integers(0, 65535, (50, 70)).astype(np.uint16))),
    "png-rgb-transparency-key": lambda: encode(noisy(), transparency=(1, 2, 3)),
    "jpeg-rgb": lambda: encode(noisy(), "JPEG", quality=90),
    "jpeg-grey": lambda: encode(noisy().convert("L"), "JPEG"),
    "jpeg-cmyk": lambda: encode(noisy().convert("CMYK"), "JPEG"),
    "webp-rgb": lambda: encode(noisy(), "WEBP", quality=80),
    "webp-rgba": lambda: encode(with_alpha(noisy()), "WEBP", lossless=True),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decode_tensor_equals_the_pil_decode_pixel_for_pixel(kind):
    data = KINDS[kind]()
    tensor = decode_tensor(data)
    assert tensor.dtype == torch.uint8 and tensor.device.type == "cpu" and tuple(tensor.shape) == (3, 50, 70)
    expected = torch.from_numpy(np.array(open_image(data))).permute(2, 0, 1)
    assert torch.equal(tensor, expected)


def test_alpha_composited_onto_white_as_to_rgb_does():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # transparent red: white
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))  # half black on white: Pillow gives 127
    tensor = decode_tensor(encode(image))
    assert tensor[:, 5, 5].tolist() == [255, 255, 255]
    assert tensor[:, 0, 0].tolist() == [0, 0, 255]
    assert tensor[:, 0, 1].tolist() == list(open_image(encode(image)).getpixel((1, 0)))


def test_exif_orientation_is_applied_like_open_image():
    image = noisy((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif.tobytes())
    tensor = decode_tensor(data)
    assert tuple(tensor.shape) == (3, 60, 40)
    assert torch.equal(tensor, rgb_tensor(open_image(data)))


def png_header_only(width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def animated(fmt):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


REFUSED = {
    "bomb": (lambda: png_header_only(9000, 9000), ImageError, "at most"),
    "animated-png": (lambda: animated("PNG"), ImageError, "animated PNG"),
    "animated-webp": (lambda: animated("WEBP"), ImageError, "animated WEBP"),
    "truncated-png": (lambda: encode(noisy((200, 200)))[:600], ImageError, "truncated or corrupt"),
    "truncated-jpeg": (lambda: encode(noisy((200, 200)), "JPEG")[:900], ImageError, "truncated or corrupt"),
    "gif": (lambda: encode(noisy(), "GIF"), UnsupportedImageError, "PNG, JPEG or WEBP"),
    "too-small": (lambda: encode(noisy((8, 8))), ImageError, "at least 16x16"),
    "empty": (lambda: b"", ImageError, "empty"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_decode_tensor_refuses_what_open_image_refuses(case):
    make, error, words = REFUSED[case]
    data = make()
    with pytest.raises(error, match=words) as pil:
        open_image(data)
    with pytest.raises(error, match=words) as tensor:
        decode_tensor(data)
    assert type(tensor.value) is type(pil.value)


def test_decode_tensor_byte_limit_is_the_same():
    limits = ImageLimits(max_bytes=100)
    with pytest.raises(ImageTooLargeError):
        decode_tensor(encode(noisy()), limits)


@pytest.fixture(scope="module")
def provider_png():
    """A provider-sized answer: OpenAI's 1536x1024 PNG with photo-like content."""
    return encode(photo_like(1536, 1024, 2))


@pytest.mark.parametrize("name", TEXT_SCORERS + ("consistency",))
def test_tensor_path_within_the_documented_tolerance(name, tiny_scorers, provider_png):
    scorer = tiny_scorers(name)
    item = next(i for i in provider_images() if i.kind == "PNG 300x200")  # upscaled: the hardest case
    for data in (provider_png, item.data):
        row = compare(scorer, type(item)("test", "image", data), repeat=0)
        assert row["pixel_max"] <= PIXEL_MAX and row["pixel_mean"] <= PIXEL_MEAN, row
        assert row["score_diff"] <= SCORE_DIFF, row


def test_batches_may_mix_pil_images_and_tensors_on_every_scorer(tiny_scorers, make_picture):
    images = [make_picture(1, (96, 64)), make_picture(2, (64, 96))]
    tensors = [rgb_tensor(image) for image in images]
    for name in TEXT_SCORERS:
        scorer = tiny_scorers(name)
        prompts = ["a red bicycle", "two dogs on a beach"]
        pil, mixed, alone = scorer.score(images, prompts), scorer.score([images[0], tensors[1]], prompts), scorer.score(tensors, prompts)
        assert mixed[0].raw == pytest.approx(pil[0].raw, abs=1e-5)
        assert mixed[1].raw == pytest.approx(alone[1].raw, abs=1e-5)
    consistency = tiny_scorers("consistency")
    out = consistency.score([tensors[0], images[1]], [images[1], tensors[0]])
    assert out[0].raw == pytest.approx(out[1].raw, abs=1e-5)


def test_vqascore_tensor_path_gives_the_processors_tokens_and_grid(tiny_scorers):
    scorer = tiny_scorers("vqascore")
    images = [photo_like(300, 200, 1), photo_like(512, 288, 2)]
    prompts = ["a cat", "a much longer prompt about a dog"]
    reference = scorer.processor(text=[scorer.prompt_text(p) for p in prompts], images=images, padding=True, return_tensors="pt")
    mine = scorer._tensor_inputs([rgb_tensor(i) for i in images], prompts)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(mine[key], reference[key]), key
    assert mine["pixel_values"].shape == reference["pixel_values"].shape
    assert (mine["pixel_values"] - reference["pixel_values"]).abs().max() <= PIXEL_MAX


# Outputs of the PIL path for fixed images, recorded with the code before the tensor path existed
# (commit 5544b44); the PIL path must keep giving them.
PINNED = {
    "pickscore": [-3.465041160583496, -3.97571063041687],
    "clipscore": [-0.24036794900894165, -0.055407751351594925],
    "aesthetic": [5.010255336761475, 5.009313583374023],
    "vqascore": [0.0027666643727570772, 0.002462796401232481],
    "consistency": [0.8877283930778503, 0.8877283930778503],
}


def pinned_images():
    def picture(seed, size):
        rng = np.random.default_rng(seed)
        w, h = size
        grad = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.uniform(0.2, 1.0, 3)
        return Image.fromarray(np.clip(grad + rng.integers(0, 80, (h, w, 3)), 0, 255).astype(np.uint8))
    return [picture(11, (512, 288)), picture(12, (300, 200))]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_pil_path_is_unchanged(name, tiny_scorers):
    scorer = tiny_scorers(name)
    images = pinned_images()
    if name == "consistency":
        out = scorer.score(images, images[::-1])
    else:
        out = scorer.score(images, ["a red bicycle leaning on a brick wall", "two dogs running on a beach at sunset"])
    assert [o.raw for o in out] == pytest.approx(PINNED[name], rel=1e-6, abs=1e-7)
    if name != "vqascore":  # what reaches the model is exactly the reference processor's output
        join = torch.stack if name in ("clipscore", "aesthetic") else torch.cat
        pil_fn = scorer.clip.preprocess if name in ("clipscore", "aesthetic") else scorer._pixels
        batch = scorer.pixel_batch(images, pil_fn, lambda t: None, join=join)
        expected = torch.stack([pil_pixels(scorer, image) for image in images])
        assert torch.equal(batch, expected)


@pytest.mark.parametrize(
    "tensor, words",
    [
        (torch.zeros(3, 64, 64), "must be uint8"),
        (torch.zeros(3, 64, 64, dtype=torch.uint8, device="meta"), "'meta' device"),
        (torch.zeros(4, 64, 64, dtype=torch.uint8), r"shape \(3, H, W\)"),
        (torch.zeros(64, 64, 3, dtype=torch.uint8), r"shape \(3, H, W\)"),
    ],
)
def test_bad_tensors_are_refused_clearly(tensor, words, tiny_scorers):
    with pytest.raises(ValueError, match=words):
        tiny_scorers("clipscore").score([tensor], ["a cup"])
    with pytest.raises(ValueError, match=words):
        tiny_scorers("consistency").score([tensor], [tensor])


def test_small_tensors_are_refused_like_small_images(tiny_scorers):
    with pytest.raises(ImageError, match="at least 16x16"):
        tiny_scorers("pickscore").score([torch.zeros(3, 8, 8, dtype=torch.uint8)], ["a cup"])


def test_input_path_setting():
    assert ScoringSettings().input_path == "pil"
    assert ScoringSettings(input_path="tensor").input_path == "tensor"
    with pytest.raises(ValidationError, match="input_path"):
        ScoringSettings(input_path="gpu")
    assert "docs/scoring.md" in ScoringSettings.model_fields["input_path"].description


class Recording:
    """A scorer model as LocalScoring sees it (the real one inside), recording its inputs."""

    def __init__(self, model):
        self.model, self.name, self.inputs = model, model.name, []

    def score(self, images, others):
        self.inputs.append(list(images) + list(others if self.name == "consistency" else []))
        return self.model.score(images, others)


def test_local_scoring_and_consistency_honour_input_path(tiny_scorers):
    data = [encode(photo_like(512, 288, 1)), encode(photo_like(300, 200, 2))]
    results = {}
    for path in ("pil", "tensor"):
        clip, consistency = Recording(tiny_scorers("clipscore")), Recording(tiny_scorers("consistency"))
        scored = asyncio.run(LocalScoring({"clipscore": clip}, {"clipscore": 1.0}, input_path=path).score(data, ["a", "b"]))
        similar = asyncio.run(LocalConsistency(consistency, input_path=path).similarity(data, data[::-1]))
        kind = torch.Tensor if path == "tensor" else Image.Image
        assert all(isinstance(i, kind) for i in clip.inputs[0] + consistency.inputs[0])
        assert all(isinstance(r, ScorerResult) for r in similar)
        results[path] = [s["clipscore"].score for s in scored] + [r.score for r in similar]
    assert results["tensor"] == pytest.approx(results["pil"], abs=SCORE_DIFF)


def test_decode_input_names_the_paths():
    data = encode(noisy())
    assert isinstance(decode_input(data), Image.Image)
    assert isinstance(decode_input(data, "tensor"), torch.Tensor)
    with pytest.raises(ValueError, match="unknown input_path"):
        decode_input(data, "gpu")
