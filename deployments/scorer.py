"""One Serve deployment class for all four scoring models; the app binds it four times under
the names PickScore, CLIPScore, VQAScore and Aesthetic, each with its own GPU fraction.

Requests carry one image and one prompt; `@serve.batch` merges them across variations,
scenes and concurrent generations. Batch size and wait time come from `user_config`, so
`serve deploy` can change them without restarting the replica.

`@serve.batch` forms a batch as soon as its wait time has passed, even while the model is
still busy with the previous one; under load every request that arrives during a forward pass
would then wait as a batch of its own (measured: mean batch 1.4 with 20 requests waiting,
docs/benchmarks.md). So Serve's batches are handed to a coalescer that runs one forward pass
at a time over everything waiting when the model frees, up to `max_batch_size` images.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import ray
from PIL import Image
from pydantic import BaseModel, Field
from ray import serve

import scorers


class BatchConfig(BaseModel):
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)


MAX_PENDING_BATCHES = 8  # Serve batches that may wait for the model; the coalescer merges them


class Coalescer:
    """One forward pass at a time over all waiting requests, up to `max_items`; a group
    (one Serve batch) is never split, so each caller gets its results back whole."""

    def __init__(self, forward, max_items: int):
        self.forward, self.max_items = forward, max_items
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((items, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            groups = [self.pending.pop(0)]
            while self.pending and sum(len(g) for g, _ in groups) + len(self.pending[0][0]) <= self.max_items:
                groups.append(self.pending.pop(0))
            try:
                outputs = await self.forward([item for items, _ in groups for item in items])
            except Exception as exc:
                for _, future in groups:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in groups:
                if not future.done():
                    future.set_result(outputs[start : start + len(items)])
                start += len(items)
            # Let the Serve batches that were waiting for a free slot join before the next pass.
            await asyncio.sleep(0.002)


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10)  # >= 16 x MAX_PENDING_BATCHES
class ScorerDeployment:
    def __init__(self, name: str, options: dict | None = None, offline_models_dir: str | None = None):
        options = dict(options or {})
        if offline_models_dir:
            from scorers.tiny import build_tiny_models

            options = {**build_tiny_models(Path(offline_models_dir))[name], **options}
        self.name = name
        self.model = scorers.load_scorer(name, **options)  # once per replica
        self.batch_sizes: list[int] = []  # recent forward-pass sizes, for tests and the benchmark
        self.coalescer = Coalescer(self._forward, max_items=16)

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config or {})
        self.score_batch.set_max_batch_size(config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.coalescer.max_items = config.max_batch_size

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_PENDING_BATCHES)
    async def score_batch(self, requests: list[tuple[bytes, str]]) -> list[dict]:
        return await self.coalescer.submit(requests)

    async def _forward(self, requests: list[tuple[bytes, str]]) -> list[dict]:
        self.batch_sizes = (self.batch_sizes + [len(requests)])[-1000:]
        # Decoding and the forward pass are CPU/GPU work: off the event loop, so new requests
        # keep arriving meanwhile.
        outputs = await asyncio.to_thread(self._score, requests)
        return [{"raw": o.raw, "score": o.score, "truncated": o.truncated} for o in outputs]

    def _score(self, requests: list[tuple[bytes, str]]):
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in requests]
        return self.model.score(images, [prompt for _, prompt in requests])

    async def score(self, image: bytes | ray.ObjectRef, prompt: str) -> dict:
        """`image` is PNG bytes. The ingress puts each image into the object store once and
        passes the same ObjectRef to all four scorers as a top-level argument, which Ray resolves
        to the bytes before this runs (a node fetches the object once for all its replicas).
        Where Serve does not resolve it (local testing mode), the reference is awaited here."""
        if isinstance(image, ray.ObjectRef):
            image = await image
        return await self.score_batch((image, prompt))

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.name} model is not loaded")
