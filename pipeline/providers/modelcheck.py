"""What happens when a configured model id is one the vendor no longer serves.

Vendors retire image and chat models every few months, and the answer is then a bare 404 in the
middle of a generation. Two places turn it into an instruction: `check()` at replica start (the
Serve layer calls it, so a retired id fails the deployment with the vendor's words and the
setting to change, before any job is accepted), and every call (a 404 becomes a non-retryable
ProviderError naming the model id and the setting). The OpenAI-compatible providers gain both
here, by subclassing, so pipeline/providers/openai_clients.py stays the plain client.
"""

from __future__ import annotations

import logging

from pipeline.providers.openai_clients import OpenAIChat, OpenAIImages
from pipeline.providers.base import ChatTask, GeneratedImage, ProviderError
from pipeline.providers.retry import with_retries
from pipeline.settings import ImageSettings, LLMSettings

logger = logging.getLogger("sceneref.providers")

# Where each model id is set in a Serve config's application args (and in a PipelineSettings).
IMAGE_MODEL_SETTING = "pipeline.images.model"
LLM_MODEL_SETTING = "pipeline.llm.model"


def unknown_model(vendor_message: str, *, provider: str, model: str, setting: str) -> str:
    """The message for a model id the vendor answered 404 for: its words, then what to set."""
    return (
        f"{provider} does not serve model {model!r}, which is retired, misspelt or not enabled for "
        f"this key ({vendor_message}); set {setting} to a current model id (docs/providers.md lists them)"
    )


def with_model_hint(error: ProviderError, *, provider: str, model: str, setting: str) -> ProviderError:
    """`error` unchanged unless it is a 404, which becomes a non-retryable unknown-model error."""
    if error.status_code != 404:
        return error
    message = unknown_model(str(error), provider=provider, model=model, setting=setting)
    return ProviderError(message, retryable=False, status_code=404)


async def check_openai_model(client, settings: LLMSettings | ImageSettings, *, setting: str) -> dict:
    """models.retrieve for the configured id: what the endpoint says about it, or ProviderError.

    OpenAI announces a retirement in the model's `shutdown_date`; a date there is logged as a
    warning and returned, so an operator sees it at every replica start before the model goes."""

    async def call():
        return await client.models.retrieve(settings.model, timeout=settings.timeout_s)

    try:
        found = await with_retries(call, settings.retry, what=f"model check ({settings.model})")
    except ProviderError as error:
        raise with_model_hint(error, provider=settings.provider, model=settings.model, setting=setting) from error
    # A declared field in current openai clients, an extra one in older ones.
    shutdown = getattr(found, "shutdown_date", None) or (found.model_extra or {}).get("shutdown_date")
    if shutdown:
        logger.warning("%s model %r shuts down on %s: set %s to its replacement", settings.provider, settings.model, shutdown, setting)
    return {"provider": settings.provider, "model": found.id, "owned_by": found.owned_by, "shutdown_date": shutdown}


class CheckedOpenAIChat(OpenAIChat):
    """OpenAIChat with a startup check and unknown-model answers (also Gemini's
    OpenAI-compatible endpoint, whose `models/{id}` route answers the same way)."""

    async def check(self) -> dict:
        return await check_openai_model(self._client, self.settings, setting=LLM_MODEL_SETTING)

    async def complete(self, messages: list[dict[str, str]], *, task: ChatTask) -> str:
        try:
            return await super().complete(messages, task=task)
        except ProviderError as error:
            hinted = with_model_hint(error, provider=self.settings.provider, model=self.settings.model, setting=LLM_MODEL_SETTING)
            if hinted is error:
                raise
            raise hinted from error


class CheckedOpenAIImages(OpenAIImages):
    """OpenAIImages with a startup check and unknown-model answers."""

    async def check(self) -> dict:
        return await check_openai_model(self._client, self.settings, setting=IMAGE_MODEL_SETTING)

    async def generate(self, prompt: str, *, reference: bytes | None, variation: int) -> GeneratedImage:
        try:
            return await super().generate(prompt, reference=reference, variation=variation)
        except ProviderError as error:
            hinted = with_model_hint(error, provider=self.settings.provider, model=self.settings.model, setting=IMAGE_MODEL_SETTING)
            if hinted is error:
                raise
            raise hinted from error
