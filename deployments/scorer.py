"""One Serve deployment class for all four scoring models; the app binds it four times under
the names PickScore, CLIPScore, VQAScore and Aesthetic, each with its own GPU fraction.

Requests carry one image and one prompt; `@serve.batch` merges them across variations,
scenes and concurrent generations into one forward pass. Batch size and wait time come from
`user_config`, so `serve deploy` can change them without restarting the replica.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, Field
from ray import serve

import scorers


class BatchConfig(BaseModel):
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class ScorerDeployment:
    def __init__(self, name: str, options: dict | None = None, offline_models_dir: str | None = None):
        options = dict(options or {})
        if offline_models_dir:
            from scorers.tiny import build_tiny_models

            options = {**build_tiny_models(Path(offline_models_dir))[name], **options}
        self.name = name
        self.model = scorers.load_scorer(name, **options)  # once per replica
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and the benchmark

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config or {})
        self.score_batch.set_max_batch_size(config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[tuple[bytes, str]]) -> list[dict]:
        self.batch_sizes = (self.batch_sizes + [len(requests)])[-1000:]
        # Decoding and the forward pass are CPU/GPU work: off the event loop, so new requests
        # keep queueing into the next batch meanwhile.
        outputs = await asyncio.to_thread(self._score, requests)
        return [{"raw": o.raw, "score": o.score, "truncated": o.truncated} for o in outputs]

    def _score(self, requests: list[tuple[bytes, str]]):
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in requests]
        return self.model.score(images, [prompt for _, prompt in requests])

    async def score(self, image: bytes, prompt: str) -> dict:
        return await self.score_batch((image, prompt))

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.name} model is not loaded")
