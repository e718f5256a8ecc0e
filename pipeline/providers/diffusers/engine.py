"""Self-hosted image generation with diffusers: text-to-image for a scene with no
reference, image-to-image from the previous scene's best image, one seed per variation.

`DiffusionEngine.generate` takes many requests (variations of several scenes, from several
generations) and runs each kind (text-to-image, image-to-image) as one pipeline call with one
`torch.Generator` per image: an image depends on its own seed, not on what else was in the
batch, so a variation can be made again from the seed in its metadata. The Serve deployment
(deployments/diffusion.py) feeds it batches; `DiffusionImages` is the same engine as an
in-process ImageProvider (the command line, tests).

One pipeline call at a time per engine: the two pipelines share their modules and their
scheduler, and a scheduler keeps per-call state (timesteps, step index).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline.providers.base import GeneratedImage, ProviderError
from pipeline.providers.diffusers.settings import DiffusionSettings
from scorers.images import PROVIDER_ANSWER, ImageError, decode_image, encode_png, to_png

PROBE_SIZE = 64  # pixels a side: the smallest that every supported family's latent grid divides
PROBE_PROMPT = "a health check image"


@dataclass(frozen=True)
class DiffusionRequest:
    prompt: str
    variation: int
    reference: bytes | None = None  # PNG/JPEG/WEBP bytes of the previous scene's best image


class UnhealthyGenerator(RuntimeError):
    """The pipeline no longer makes usable images; Serve replaces the replica."""


@dataclass
class _Prepared:
    index: int
    request: DiffusionRequest
    seed: int
    reference: Image.Image | None


class DiffusionEngine:
    """A loaded pipeline pair and the rules for using it; no Ray."""

    def __init__(self, settings: DiffusionSettings):
        from pipeline.providers.diffusers.loading import load_pipelines
        from pipeline.providers.diffusers.tiny import RANDOM_WEIGHTS

        self.settings = settings
        self.text2img, self.img2img, folder, self.device, self.dtype = load_pipelines(settings)
        self.random_weights = (Path(folder) / RANDOM_WEIGHTS).exists()
        self.scheduler = type(self.text2img.scheduler).__name__
        accepted = inspect.signature(self.text2img.__call__).parameters
        if settings.max_sequence_length is not None and "max_sequence_length" not in accepted:
            # SD pipelines swallow unknown keywords: the setting would silently do nothing.
            raise ValueError(f"{type(self.text2img).__name__} does not take max_sequence_length: leave it null")
        self._lock = threading.Lock()
        self.healthy_at = -math.inf  # monotonic time of the last call that gave finite pixels
        self.probes = 0  # health probes run, for tests
        self.calls: list[tuple[str, int]] = []  # recent (operation, batch size) pipeline calls

    def seed_for(self, variation: int) -> int:
        if self.settings.seed is None:
            return secrets.randbelow(2**31)
        return self.settings.seed + variation

    def generate(self, requests: Sequence[DiffusionRequest]) -> list[GeneratedImage | ProviderError]:
        """One result per request, in order: an image, or the ProviderError of that request alone."""
        results: list[GeneratedImage | ProviderError | None] = [None] * len(requests)
        groups: dict[str, list[_Prepared]] = {"text2img": [], "img2img": []}
        for index, request in enumerate(requests):
            try:
                reference = None if request.reference is None else self._reference(request.reference)
            except ProviderError as error:
                results[index] = error
                continue
            groups["text2img" if reference is None else "img2img"].append(
                _Prepared(index, request, self.seed_for(request.variation), reference)
            )
        size = self.settings.max_batch_size
        for operation, items in groups.items():
            for start in range(0, len(items), size):
                for item, result in self._run_isolated(operation, items[start : start + size]):
                    results[item.index] = result
        return results  # type: ignore[return-value]

    def _reference(self, data: bytes) -> Image.Image:
        """Through the one image intake, then fitted to the output size: scaled to cover it and
        centre-cropped, so a reference of another shape is not stretched."""
        width, height = self.settings.dimensions
        limits = dataclasses.replace(PROVIDER_ANSWER, max_side=2 * max(width, height))
        try:
            image = decode_image(data, limits).image
        except ImageError as error:
            raise ProviderError(f"diffusers: reference is not a usable image ({error})") from error
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)

    def _run_isolated(self, operation: str, items: list[_Prepared]):
        """A failed batch is retried an image at a time, so one bad request fails only itself."""
        try:
            return list(zip(items, self._run(operation, items)))
        except Exception as error:
            if len(items) == 1:
                return [(items[0], _provider_error(operation, items[0], error))]
        return [pair for item in items for pair in self._run_isolated(operation, [item])]

    def _run(self, operation: str, items: list[_Prepared]) -> list[GeneratedImage | ProviderError]:
        import torch

        settings = self.settings
        width, height = settings.dimensions
        pipeline = self.text2img if operation == "text2img" else self.img2img
        if pipeline is None:
            raise ProviderError(f"diffusers: {settings.model} has no image-to-image pipeline for a chained scene")
        # CPU generators: the same seed gives the same starting noise on any GPU or on CPU.
        arguments = {
            "prompt": [item.request.prompt for item in items],
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in items],
            "output_type": "np",
        }
        if settings.max_sequence_length is not None:
            arguments["max_sequence_length"] = settings.max_sequence_length
        if operation == "text2img":
            arguments.update(height=height, width=width)
        else:
            arguments.update(image=[item.reference for item in items], strength=settings.strength)
        with self._lock, torch.inference_mode():
            output = pipeline(**arguments)
        self.calls = (self.calls + [(operation, len(items))])[-1000:]
        flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(items)
        results = [
            self._image(operation, item, pixels, bool(blocked), len(items))
            for item, pixels, blocked in zip(items, np.asarray(output.images), flagged)
        ]
        if any(isinstance(r, GeneratedImage) for r in results):
            self.healthy_at = time.monotonic()
        return results

    def _image(self, operation, item: _Prepared, pixels: np.ndarray, blocked: bool, batch: int):
        what = f"diffusers {operation} ({self.settings.model}, variation {item.request.variation}, seed {item.seed})"
        if blocked:
            return ProviderError(f"{what}: blocked by the model's safety checker")
        if not np.isfinite(pixels).all():
            return ProviderError(f"{what}: non-finite pixels (a float16 overflow? try dtype bfloat16 or float32)")
        rgb = Image.fromarray(np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8), "RGB")
        return GeneratedImage(
            data=to_png(encode_png(rgb), PROVIDER_ANSWER),
            metadata={
                "provider": "diffusers",
                "model": self.settings.model,
                "operation": operation,
                "size": self.settings.size,
                "variation": item.request.variation,
                "seed": item.seed,
                "steps": self.settings.steps,
                "guidance_scale": self.settings.guidance_scale,
                "strength": self.settings.strength if operation == "img2img" else None,
                "scheduler": self.scheduler,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device,
                "batch_size": batch,
                "reference_used": operation == "img2img",
                "random_weights": self.random_weights,
                "request_id": None,
                "revised_prompt": None,
            },
        )

    def check_health(self) -> None:
        """A generation with finite pixels within `health_check_cache_s` is proof enough, so a
        busy replica pays nothing; otherwise one step at 64x64 through the real pipeline. Waits
        for a running batch (a hung one then fails Serve's health-check timeout)."""
        import torch

        if time.monotonic() - self.healthy_at < self.settings.health_check_cache_s:
            return
        with self._lock:
            if time.monotonic() - self.healthy_at < self.settings.health_check_cache_s:
                return
            self.probes += 1
            try:
                with torch.inference_mode():
                    output = self.text2img(
                        prompt=PROBE_PROMPT, num_inference_steps=1, guidance_scale=self.settings.guidance_scale,
                        height=PROBE_SIZE, width=PROBE_SIZE, generator=torch.Generator("cpu").manual_seed(0),
                        output_type="np",
                    )
                finite = bool(np.isfinite(np.asarray(output.images)).all())
            except Exception as error:
                raise UnhealthyGenerator(f"diffusers health probe failed: {type(error).__name__}: {error}") from error
            if not finite:
                raise UnhealthyGenerator("diffusers health probe gave non-finite pixels: weights or device are broken")
            self.healthy_at = time.monotonic()


def _provider_error(operation: str, item: _Prepared, error: Exception) -> ProviderError:
    if isinstance(error, ProviderError):
        return error
    # Out of memory may pass with a smaller batch or a quieter GPU: worth another try later.
    retryable = type(error).__name__ == "OutOfMemoryError"
    return ProviderError(
        f"diffusers {operation} (variation {item.request.variation}, seed {item.seed}): {type(error).__name__}: {error}",
        retryable=retryable,
    )


class DiffusionImages:
    """The engine as an in-process ImageProvider. Calls are not merged here (the Serve
    deployment batches); they take turns on the one pipeline."""

    def __init__(self, settings: DiffusionSettings, engine: DiffusionEngine | None = None):
        self.settings = settings
        self.engine = engine or DiffusionEngine(settings)

    async def generate(self, prompt: str, *, reference: bytes | None, variation: int) -> GeneratedImage:
        request = DiffusionRequest(prompt, variation, reference)
        [result] = await asyncio.to_thread(self.engine.generate, [request])
        if isinstance(result, ProviderError):
            raise result
        return result
