"""The two provider protocols the pipeline talks to, so the same runner works with the
OpenAI-compatible clients, the offline pair, or Ray Serve handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

ChatTask = Literal["storyboard", "cinematographer", "prompt_engineer"]


class ProviderError(RuntimeError):
    """A provider call that failed for good (after retries, or not retryable)."""

    def __init__(self, message: str, *, retryable: bool = False, status_code: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class ChatModel(Protocol):
    async def complete(self, messages: list[dict[str, str]], *, task: ChatTask) -> str:
        """Return the assistant's text (JSON expected). `task` names the agent for logs and
        for the offline provider; real endpoints ignore it."""


@dataclass
class GeneratedImage:
    data: bytes  # PNG bytes
    metadata: dict = field(default_factory=dict)  # provider, model, request_id, revised_prompt, seed


class ImageProvider(Protocol):
    async def generate(self, prompt: str, *, reference: bytes | None, variation: int) -> GeneratedImage:
        """One independent sample. With `reference`, an edit conditioned on that image."""
