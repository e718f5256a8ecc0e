"""How far the tensor input path (decode with torchvision, preprocess with tensor ops) is from
the PIL reference path, on images of the sizes and kinds the providers return.

    .venv/bin/python -m benchmarks.input_path [--shapes tiny] [--json out.json] [--repeat 3]

For every image and scorer, both paths run on the same model: the preprocessed pixel tensors
are compared in normalised units (what the model sees), then `raw` and `score`. The CPU time
per image of each path (decode + that scorer's preprocessing, process CPU time, all threads)
is measured here on the host with one torch thread, split for the tensor path into the decode
(host work on any device) and the tensor ops (done here on the CPU; on a GPU on the device).
Random-weight models (`scorers.tiny`) are enough: preprocessing does not depend on weights,
and their raw/score deviations show how pixel deviations carry through a forward pass (real
weights' scores differ in scale: see docs/scoring.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

SCORERS = ("pickscore", "clipscore", "vqascore", "aesthetic", "consistency")
PROMPT = "a ceramic coffee cup on a wooden table, morning light"


@dataclass(frozen=True)
class TestImage:
    name: str  # who sends it
    kind: str  # format and mode as stored
    data: bytes


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients, blurred and fine noise, hard-edged shapes and thin lines: the
    mix of flat areas, texture and edges where resampling filters differ, not a flat picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        120 + 100 * np.sin(x / width * np.pi * rng.uniform(1, 3) + rng.uniform(0, 6)),
        110 + 90 * np.cos(y / height * np.pi * rng.uniform(1, 3)),
        100 + 80 * np.sin((x + y) / (width + height) * np.pi * 4),
    ], axis=-1)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8))
    blotches = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) - 127
    pixels = np.clip(base + 0.5 * blotches + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    for _ in range(20):
        points = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    return image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def provider_images() -> list[TestImage]:
    """OpenAI gpt-image (PNG in three sizes, JPEG and WebP output formats), Gemini (PNG/JPEG,
    square, 16:9 and 9:16), the offline provider (512x288 PNG), and user uploads (RGBA PNG,
    palette PNG, greyscale JPEG, a small 300x200 image that every scorer upscales)."""
    rgba = photo_like(1024, 768, 10).convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgba.size).point(lambda v: 40 + v * 215 // 255)
    rgba.putalpha(alpha)
    return [
        TestImage("openai", "PNG 1024x1024", _encode(photo_like(1024, 1024, 1), "PNG")),
        TestImage("openai", "PNG 1536x1024", _encode(photo_like(1536, 1024, 2), "PNG")),
        TestImage("openai", "PNG 1024x1536", _encode(photo_like(1024, 1536, 3), "PNG")),
        TestImage("openai", "JPEG 1536x1024", _encode(photo_like(1536, 1024, 4), "JPEG", quality=90)),
        TestImage("openai", "WEBP 1024x1536", _encode(photo_like(1024, 1536, 5), "WEBP", quality=90)),
        TestImage("gemini", "PNG 1024x1024", _encode(photo_like(1024, 1024, 6), "PNG")),
        TestImage("gemini", "JPEG 1344x768", _encode(photo_like(1344, 768, 7), "JPEG", quality=95)),
        TestImage("gemini", "PNG 768x1344", _encode(photo_like(768, 1344, 8), "PNG")),
        TestImage("offline", "PNG 512x288", _encode(photo_like(512, 288, 9), "PNG")),
        TestImage("upload", "PNG RGBA 1024x768", _encode(rgba, "PNG")),
        TestImage("upload", "PNG palette 800x600",
                  _encode(photo_like(800, 600, 11).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
        TestImage("upload", "JPEG grey 640x480", _encode(photo_like(640, 480, 12).convert("L"), "JPEG", quality=90)),
        TestImage("upload", "PNG 300x200", _encode(photo_like(300, 200, 13), "PNG")),
    ]


def pil_pixels(scorer, image: Image.Image) -> torch.Tensor:
    """What the PIL path feeds the model for one image (the scorer's own preprocessing)."""
    if scorer.name in ("pickscore", "consistency"):
        return scorer._pixels(image)[0]
    if scorer.name in ("clipscore", "aesthetic"):
        return scorer.clip.preprocess(image)
    return scorer.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]


def tensor_pixels(scorer, image: torch.Tensor) -> torch.Tensor:
    """What the tensor path feeds the model for one image."""
    out = scorer.tensor_transform(image.to(scorer.device))
    return out[0] if isinstance(out, tuple) else out


def _cpu_seconds(fn, repeat: int) -> float:
    """Process CPU time (all threads) of fn, the best of `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def compare(scorer, item: TestImage, repeat: int = 1) -> dict:
    """One scorer, one image: pixel, raw and score deviation of the tensor path from the PIL path,
    and each path's CPU seconds (decode + preprocessing)."""
    from scorers.images import decode_tensor, open_image

    pil, tensor = open_image(item.data), decode_tensor(item.data)
    with torch.inference_mode():
        a, b = pil_pixels(scorer, pil).float(), tensor_pixels(scorer, tensor).float().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{scorer.name} {item.kind}: PIL pixels {tuple(a.shape)}, tensor pixels {tuple(b.shape)}")
    diff = (a - b).abs()
    if scorer.name == "consistency":
        ref = open_image(provider_images()[0].data) if item.kind != "PNG 1024x1024" else pil
        [out_pil], [out_tensor] = scorer.score([pil], [ref]), scorer.score([tensor], [ref])
    else:
        [out_pil], [out_tensor] = scorer.score([pil], [PROMPT]), scorer.score([tensor], [PROMPT])
    row = {
        "scorer": scorer.name, "source": item.name, "image": item.kind,
        "pixel_max": float(diff.max()), "pixel_mean": float(diff.mean()),
        "raw_pil": out_pil.raw, "raw_diff": abs(out_pil.raw - out_tensor.raw),
        "score_diff": abs(out_pil.score - out_tensor.score),
    }
    if repeat:
        with torch.inference_mode():
            row["cpu_ms_pil"] = 1000 * _cpu_seconds(lambda: pil_pixels(scorer, open_image(item.data)), repeat)
            row["cpu_ms_decode"] = 1000 * _cpu_seconds(lambda: decode_tensor(item.data), repeat)
            row["cpu_ms_tensor"] = 1000 * _cpu_seconds(lambda: tensor_pixels(scorer, tensor), repeat)
    return row


def load_scorers(shapes: str, root: Path) -> dict:
    import scorers
    from scorers.tiny import build_tiny_models

    options = build_tiny_models(root, shapes)
    return {name: scorers.load_scorer(name, **options[name], device="cpu", dtype="fp32") for name in SCORERS}


def table(rows: list[dict]) -> str:
    lines = ["| scorer | image | pixels max / mean (normalised) | raw diff | score diff | CPU ms: PIL / decode_tensor + tensor ops |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cpu = f"{r['cpu_ms_pil']:.1f} / {r['cpu_ms_decode']:.1f} + {r['cpu_ms_tensor']:.1f}" if "cpu_ms_pil" in r else "-"
        lines.append(f"| {r['scorer']} | {r['source']} {r['image']} | {r['pixel_max']:.4f} / {r['pixel_mean']:.5f} | "
                     f"{r['raw_diff']:.2e} | {r['score_diff']:.2e} | {cpu} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = ["| scorer | pixels max | pixels mean (worst image) | raw diff max | score diff max | CPU ms/image, mean: PIL / decode_tensor + tensor ops |",
             "|---|---|---|---|---|---|"]
    for name in SCORERS:
        mine = [r for r in rows if r["scorer"] == name]
        if not mine:
            continue
        cpu = "-"
        if "cpu_ms_pil" in mine[0]:
            cpu = " / ".join(f"{np.mean([r[k] for r in mine]):.1f}" for k in ("cpu_ms_pil", "cpu_ms_decode"))
            cpu += f" + {np.mean([r['cpu_ms_tensor'] for r in mine]):.1f}"
        lines.append(f"| {name} | {max(r['pixel_max'] for r in mine):.4f} | {max(r['pixel_mean'] for r in mine):.5f} | "
                     f"{max(r['raw_diff'] for r in mine):.2e} | {max(r['score_diff'] for r in mine):.2e} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny", help="model shapes of scorers.tiny (tiny, bench, ...)")
    parser.add_argument("--models", default=None, help="folder for the built models (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs per image and path (0: no timing)")
    parser.add_argument("--json", default=None, help="also write the rows and the summary here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # per-image CPU time, comparable with PIL's single-threaded work
    root = Path(args.models or tempfile.mkdtemp(prefix="sceneref-input-path-"))
    models = load_scorers(args.shapes, root)
    rows = [compare(model, item, args.repeat) for item in provider_images() for model in models.values()]
    print(table(rows))
    print()
    print(summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"shapes": args.shapes, "torch": torch.__version__,
                                               "rows": rows, "summary": summary(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
