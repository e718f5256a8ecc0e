"""Pick the providers a PipelineSettings asks for. Chat and images are chosen separately, so a
real LLM can drive the offline image generator, and a deployment that needs only one of them
never asks for the other's API key.

Real providers have `check()`: the Serve layer calls `check_provider` at replica start so a
retired or unknown model id fails there, with the vendor's message and the setting to change
(pipeline/providers/modelcheck.py), instead of in the first generation."""

from __future__ import annotations

from pipeline.providers.modelcheck import CheckedOpenAIChat, CheckedOpenAIImages
from pipeline.providers.offline import OfflineChat, OfflineImages
from pipeline.providers.base import ChatModel, ImageProvider, ProviderError
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings


def build_chat(settings: LLMSettings) -> ChatModel:
    """Raises ProviderError naming the env var when a real provider has no API key.

    `gemini` is the same OpenAI client against Google's OpenAI-compatible endpoint: the agents'
    messages are OpenAI-shaped (system turn, image_url parts, JSON mode), so nothing is
    translated and retries, JSON validation and the test double are shared (docs/providers.md)."""
    return OfflineChat() if settings.provider == "offline" else CheckedOpenAIChat(settings)


def build_images(settings: ImageSettings) -> ImageProvider:
    """Raises ProviderError naming the env var when a real provider has no API key."""
    if settings.provider == "offline":
        return OfflineImages(settings)
    if settings.provider == "gemini":
        from pipeline.providers.gemini import GeminiImages  # google-genai is imported only when chosen

        return GeminiImages(settings)
    if settings.provider == "openai":
        return CheckedOpenAIImages(settings)
    if settings.provider == "diffusers":  # in this process (the CLI); under Serve: deployments/diffusion.py
        from pipeline.providers.diffusers.engine import DiffusionImages

        return DiffusionImages(settings.diffusion)
    # Never fall through to another vendor's client.
    raise ProviderError(f"unknown image provider {settings.provider!r}")


def build_providers(settings: PipelineSettings) -> tuple[ChatModel, ImageProvider]:
    return build_chat(settings.llm), build_images(settings.images)


async def check_provider(provider: ChatModel | ImageProvider) -> dict | None:
    """The provider's startup check (what the vendor says about the configured model), or None
    for providers with nothing to check (offline). Raises ProviderError for a model the vendor
    does not serve."""
    check = getattr(provider, "check", None)
    return None if check is None else await check()
