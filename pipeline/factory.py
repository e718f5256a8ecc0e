"""Pick the provider pair a PipelineSettings asks for; chat and images are chosen separately,
so e.g. a real LLM can drive the offline image generator."""

from __future__ import annotations

from pipeline.offline import OfflineChat, OfflineImages
from pipeline.openai_clients import OpenAIChat, OpenAIImages
from pipeline.providers import ChatModel, ImageProvider
from pipeline.settings import PipelineSettings


def build_providers(settings: PipelineSettings) -> tuple[ChatModel, ImageProvider]:
    """Raises ProviderError naming the env var when a real provider has no API key."""
    chat: ChatModel = OfflineChat() if settings.llm.provider == "offline" else OpenAIChat(settings.llm)
    images: ImageProvider = (
        OfflineImages(settings.images) if settings.images.provider == "offline" else OpenAIImages(settings.images)
    )
    return chat, images
