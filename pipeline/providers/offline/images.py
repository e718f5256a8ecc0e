"""Offline images: a procedural renderer that visibly depends on the prompt, the variation and
the reference image, so chaining and selection can be seen working without an image API.
Every image carries a visible OFFLINE DEMO label, so it is never mistaken for a real one.
"""

from __future__ import annotations

import asyncio
import colorsys
import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.providers.offline.common import stable_hash
from pipeline.providers.base import GeneratedImage, ProviderError
from pipeline.settings import ImageSettings
from scorers.images import PROVIDER_ANSWER, ImageError, open_image

OFFLINE_LABEL = "OFFLINE DEMO"


def _palette(prompt: str) -> np.ndarray:
    """Four colours from the prompt: a base hue and three related ones."""
    seed = stable_hash("palette", prompt)
    hue = (seed % 360) / 360
    offsets = (0.0, 0.08 + (seed >> 9) % 20 / 100, 0.5, 0.92)
    colours = []
    for index, offset in enumerate(offsets):
        saturation = 0.45 + ((seed >> (12 + index * 4)) % 10) / 25
        value = 0.35 + index * 0.18
        colours.append(colorsys.hsv_to_rgb((hue + offset) % 1.0, min(saturation, 0.95), min(value, 0.98)))
    return np.array(colours, dtype=np.float32) * 255


@functools.lru_cache(maxsize=8)
def _label_font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(12, height // 18))
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def render_offline_image(
    prompt: str, *, variation: int, reference: bytes | None, size: tuple[int, int]
) -> tuple[bytes, int]:
    """A labelled procedural PNG and its seed. The prompt picks the palette and shapes, the
    variation re-lays the composition, and a reference is blended in so chained scenes share
    its colours and layout."""
    width, height = size
    seed = stable_hash("image", prompt, variation) % 2**31
    rng = np.random.default_rng(seed)
    colours = _palette(prompt)

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    angle = rng.uniform(0, np.pi)
    t = np.clip((np.cos(angle) * (u - 0.5) + np.sin(angle) * (v - 0.5)) + 0.5, 0, 1)[..., None]
    canvas = colours[0] * (1 - t) + colours[1] * t

    shape_rng = np.random.default_rng(stable_hash("shapes", prompt) % 2**31)
    for index in range(4 + int(shape_rng.integers(0, 3))):
        cx, cy = rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.85)
        radius = shape_rng.uniform(0.08, 0.22)
        colour = colours[2 + index % 2]
        dx, dy = (u - cx) * (width / height), v - cy
        if shape_rng.random() < 0.5:
            mask = (dx * dx + dy * dy) < radius * radius
        else:
            mask = (np.abs(dx) < radius * 1.3) & (np.abs(dy) < radius * 0.7)
        canvas[mask] = canvas[mask] * 0.25 + colour * 0.75
    horizon = rng.uniform(0.55, 0.8)
    canvas[v[..., 0] > horizon] *= 0.7

    if reference is not None:
        try:  # the one image intake, with the rules an image API applies to its inputs
            ref = open_image(reference, PROVIDER_ANSWER)
        except ImageError as error:
            raise ProviderError(f"offline images: reference is not a usable image ({error})") from error
        ref_pixels = np.asarray(ref.resize((width, height)), dtype=np.float32)
        canvas = canvas * 0.55 + ref_pixels * 0.45

    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    font = _label_font(height)
    left, top, right, bottom = draw.textbbox((0, 0), OFFLINE_LABEL, font=font)
    pad = max(3, height // 60)
    box = (pad, height - (bottom - top) - 3 * pad, right - left + 3 * pad, height - pad)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((box[0] + pad - left, box[1] + pad - top), OFFLINE_LABEL, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue(), seed


class OfflineImages:
    """Deterministic ImageProvider: same prompt, variation and reference, same PNG.
    `latency_s` simulates a remote API for benchmarks."""

    def __init__(self, settings: ImageSettings, latency_s: float = 0.0):
        self.settings = settings
        self.latency_s = latency_s

    async def generate(self, prompt: str, *, reference: bytes | None, variation: int) -> GeneratedImage:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        data, seed = await asyncio.to_thread(
            render_offline_image, prompt, variation=variation, reference=reference, size=self.settings.dimensions
        )
        return GeneratedImage(
            data=data,
            metadata={
                "provider": "offline",
                "model": self.settings.model,
                "size": self.settings.size,
                "variation": variation,
                "seed": seed,
                "reference_used": reference is not None,
                "offline": True,
            },
        )
