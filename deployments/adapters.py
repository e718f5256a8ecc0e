"""The only place where the pipeline meets Serve: its provider and scoring protocols
implemented over deployment handles."""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

from pipeline.providers import GeneratedImage, ProviderError
from pipeline.schemas import ScorerResult
from pipeline.scoring import ScoringError


def _raise_if_error(result: dict) -> dict:
    if "error" in result:
        raise ProviderError(result["error"], retryable=result["retryable"], status_code=result["status_code"])
    return result


class HandleChat:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def complete(self, messages, *, task) -> str:
        return _raise_if_error(await self.handle.complete.remote(messages, task))["text"]


class HandleImages:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, prompt, *, reference, variation) -> GeneratedImage:
        result = _raise_if_error(await self.handle.generate.remote(prompt, reference, variation))
        return GeneratedImage(data=result["data"], metadata=result["metadata"])


class HandleScoring:
    """One request per image and scorer, all in flight at once: each scorer deployment's
    `@serve.batch` merges them with requests from other scenes and generations."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles

    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        names = list(self.handles)
        calls = [self.handles[name].score.remote(image, prompt) for image, prompt in zip(images, prompts) for name in names]
        outputs = await asyncio.gather(*calls, return_exceptions=True)
        for i, out in enumerate(outputs):
            if isinstance(out, BaseException):
                # A replica's error arrives wrapped with its traceback; the status shows its last line.
                reason = (str(out).strip().splitlines() or [type(out).__name__])[-1]
                raise ScoringError(f"{names[i % len(names)]}: {reason}") from out
        results = []
        for i in range(len(images)):
            row = outputs[i * len(names) : (i + 1) * len(names)]
            results.append({name: ScorerResult(**out) for name, out in zip(names, row)})
        return results
