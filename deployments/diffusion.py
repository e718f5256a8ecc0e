"""The self-hosted generator as a Serve deployment: a thin shell around pipeline.providers.diffusers.

`generate` has the ImageGenerator deployment's signature and answer (deployments/providers.py),
so HandleImages drives either one. `@serve.batch` merges the calls of all variations, scenes
and generations that reach a replica within `batch_wait_timeout_s`; the engine runs them as
one text-to-image and one image-to-image pipeline call. The replica loads the model once; give
it a GPU (or a fraction) in the config's `ray_actor_options`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ray import serve

from pipeline.providers.diffusers.engine import DiffusionEngine, DiffusionRequest
from pipeline.providers.diffusers.settings import DiffusionSettings
from pipeline.providers.base import GeneratedImage, ProviderError

DEFAULTS = DiffusionSettings.model_fields


def _answer(result: GeneratedImage | ProviderError) -> dict:
    if isinstance(result, ProviderError):
        return {"error": str(result), "retryable": result.retryable, "status_code": result.status_code}
    return {"data": result.data, "metadata": result.metadata}


@serve.deployment(max_ongoing_requests=32, health_check_period_s=10)
class DiffusionGenerator:
    def __init__(self, settings: DiffusionSettings | dict | None = None, offline_models_dir: str | None = None,
                 threads: int | None = None):
        """`offline_models_dir`: build (once) and use the tiny random-weight pipeline there, as
        the scorers do for the offline configs. `threads`: torch threads, for CPU replicas
        (Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPU)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        settings = DiffusionSettings.model_validate(settings or {})
        if offline_models_dir:
            from pipeline.providers.diffusers.tiny import build_tiny_pipeline

            tiny = build_tiny_pipeline(Path(offline_models_dir) / "diffusion")
            settings = settings.model_copy(update={"model": str(tiny)})
        self.engine = DiffusionEngine(settings)
        self.batch_sizes: list[int] = []  # recent Serve batch sizes, for tests and benchmarks
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def generate(self, prompt: str, reference: bytes | None, variation: int) -> dict:
        """PNG bytes and metadata (seed included), or a provider error as a plain dict."""
        return await self._generate_batch((prompt, reference, variation))

    @serve.batch(max_batch_size=DEFAULTS["max_batch_size"].default,
                 batch_wait_timeout_s=DEFAULTS["batch_wait_timeout_s"].default)
    async def _generate_batch(self, requests: list[tuple[str, bytes | None, int]]) -> list[dict]:
        # Decoding and denoising are CPU/GPU work: off the event loop, so requests keep arriving.
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[tuple[str, bytes | None, int]]) -> list[dict]:
        self.batch_sizes = (self.batch_sizes + [len(requests)])[-1000:]
        batch = [DiffusionRequest(prompt, variation, reference) for prompt, reference, variation in requests]
        return [_answer(result) for result in self.engine.generate(batch)]

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    async def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; the engine's probe (cached while the
        replica is generating) raises UnhealthyGenerator and Serve replaces the replica."""
        await asyncio.to_thread(self.engine.check_health)

    def health_probes(self) -> int:
        return self.engine.probes
