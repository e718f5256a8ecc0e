"""Pick the providers a PipelineSettings asks for. Chat and images are chosen separately, so a
real LLM can drive the offline image generator, and a deployment that needs only one of them
never asks for the other's API key."""

from __future__ import annotations

from pipeline.offline import OfflineChat, OfflineImages
from pipeline.openai_clients import OpenAIChat, OpenAIImages
from pipeline.providers import ChatModel, ImageProvider
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings


def build_chat(settings: LLMSettings) -> ChatModel:
    """Raises ProviderError naming the env var when a real provider has no API key."""
    return OfflineChat() if settings.provider == "offline" else OpenAIChat(settings)


def build_images(settings: ImageSettings) -> ImageProvider:
    """Raises ProviderError naming the env var when a real provider has no API key."""
    return OfflineImages(settings) if settings.provider == "offline" else OpenAIImages(settings)


def build_providers(settings: PipelineSettings) -> tuple[ChatModel, ImageProvider]:
    return build_chat(settings.llm), build_images(settings.images)
