"""Generator and agent deployments: thin wrappers around the pipeline's providers.

Their work is waiting on remote APIs, so each replica takes many requests at once
(`max_ongoing_requests`); the providers' own semaphores cap concurrency per provider.
Provider failures travel back as plain dicts, so the caller can rebuild the same
ProviderError (with `retryable` and the status code) instead of a wrapped Ray error.
"""

from __future__ import annotations

from ray import serve

from deployments.metrics import install as install_metrics
from pipeline.providers.factory import build_chat, build_images, check_provider
from pipeline.providers.base import ProviderError
from pipeline.settings import PipelineSettings
from pipeline.telemetry import collect


def _error(exc: ProviderError) -> dict:
    return {"error": str(exc), "retryable": exc.retryable, "status_code": exc.status_code}


@serve.deployment(max_ongoing_requests=128)
class ImageGenerator:
    async def __init__(self, settings: PipelineSettings):
        install_metrics()  # the provider's calls, retries and errors (pipeline.providers.retry's hooks)
        self.provider = build_images(settings.images)
        # A retired or unknown model id fails the replica at start, with the vendor's message
        # and the setting to change, instead of failing every generation later.
        self.model = await check_provider(self.provider)

    async def generate(self, prompt: str, reference: bytes | None, variation: int) -> dict:
        try:
            image = await self.provider.generate(prompt, reference=reference, variation=variation)
        except ProviderError as exc:
            return _error(exc)
        return {"data": image.data, "metadata": image.metadata}


@serve.deployment(max_ongoing_requests=128)
class PromptAgents:
    async def __init__(self, settings: PipelineSettings):
        install_metrics()
        self.chat = build_chat(settings.llm)
        self.model = await check_provider(self.chat)

    async def complete(self, messages: list[dict[str, str]], task: str) -> dict:
        # The tokens are accounted where the call is made, here; they go back with the answer
        # (also with a failure: a call that answered was billed) for the caller's ledgers.
        with collect() as calls:
            try:
                answer = {"text": await self.chat.complete(messages, task=task)}
            except ProviderError as exc:
                answer = _error(exc)
        return {**answer, "usage": [usage.model_dump() for usage in calls]}
