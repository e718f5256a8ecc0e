"""ChatModel and ImageProvider over the official `openai` client, for any OpenAI-compatible
endpoint (OpenAI, vLLM, Ollama, a gateway). Retries are ours (pipeline.providers.retry), not the
client's, so they are explicit, logged and counted in metadata."""

from __future__ import annotations

import asyncio
import base64
import logging

import openai
from scorers.images import PROVIDER_ANSWER, to_png

from pipeline.costs import CallUsage
from pipeline.providers.base import ChatTask, GeneratedImage, ProviderError
from pipeline.providers.retry import with_retries
from pipeline.settings import ImageSettings, LLMSettings
from pipeline.structured import ResponseFormat, response_format
from pipeline.telemetry import account

log = logging.getLogger("sceneref.providers")


def make_client(settings: LLMSettings | ImageSettings, *, role: str) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client for `settings`, failing early with the env var to set."""
    key = settings.api_key()
    if not key:
        raise ProviderError(
            f"No API key for the {role} provider: set the {settings.api_key_env} environment "
            f"variable (any non-empty value for a keyless local endpoint), or run with --offline "
            f"to use the offline demo providers."
        )
    return openai.AsyncOpenAI(
        api_key=key, base_url=settings.base_url, timeout=settings.timeout_s, max_retries=0
    )


class OpenAIChat:
    """ChatModel over chat.completions. Each request carries its task's reply schema
    (`llm.structured_output: json_schema`) or asks for JSON mode; the agents validate either way.

    An endpoint that refuses json_schema (a 400 naming response_format or json_schema) is asked
    again at once in JSON mode, and this client stays in JSON mode from then on: the refusal is
    logged once and recorded with every later call, so the traces say why no schema was sent."""

    def __init__(self, settings: LLMSettings, client: openai.AsyncOpenAI | None = None):
        self.settings = settings
        self._client = client or make_client(settings, role="LLM")
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self.response_format: ResponseFormat = settings.structured_output
        self.fallback: str | None = None  # the endpoint's refusal of json_schema, once it came

    async def complete(self, messages: list[dict[str, str]], *, task: ChatTask) -> str:
        settings = self.settings

        async def create(mode: ResponseFormat):
            # Reasoning models refuse a sampling temperature: unset, none is sent.
            sampling = {} if settings.temperature is None else {"temperature": settings.temperature}
            return await self._client.chat.completions.create(
                model=settings.model,
                messages=messages,  # type: ignore[arg-type]
                response_format=response_format(task, mode),  # type: ignore[arg-type]
                timeout=settings.timeout_s,
                **sampling,
            )

        async def call() -> str:
            # Held per attempt, not across backoff sleeps, so waiting calls free the slot.
            async with self._semaphore:
                mode = self.response_format
                try:
                    response = await create(mode)
                except openai.BadRequestError as error:
                    if mode != "json_schema" or not _refuses_schema(error):
                        raise
                    self._fall_back(error)
                    mode = "json_object"
                    response = await create(mode)
            # Billed whether or not its content is usable.
            account(_chat_usage(settings, task, response, mode, self.fallback if mode == "json_object" else None))
            if not response.choices or response.choices[0].message.content is None:
                raise ProviderError(
                    f"chat {task} ({settings.model}): response has no message content "
                    f"(request {response._request_id})",
                    retryable=True,
                )
            return response.choices[0].message.content

        return await with_retries(call, settings.retry, what=f"chat {task} ({settings.model})")

    def _fall_back(self, error: openai.BadRequestError) -> None:
        if self.response_format == "json_object":  # a concurrent call fell back first
            return
        self.response_format = "json_object"
        self.fallback = f"json_schema refused (HTTP 400: {_message(error)})"
        log.warning(
            "chat (%s): the endpoint refused response_format json_schema, so replies are asked in "
            "json_object mode from now on (set llm.structured_output: json_object to skip the try): %s",
            self.settings.model, _message(error),
        )


def _message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(inner.get("message") or error.message)[:300]


def _refuses_schema(error: openai.BadRequestError) -> bool:
    """A 400 about the response format (not, say, a bad message), so JSON mode may work."""
    text = f"{_message(error)} {error.message}".lower()
    return "response_format" in text or "json_schema" in text


def _chat_usage(settings: LLMSettings, task: str, response, mode: str, fallback: str | None) -> CallUsage:
    """The tokens of one chat answer, as the endpoint reports them (None where it does not),
    and how its reply was constrained."""
    usage = getattr(response, "usage", None)
    return CallUsage(
        kind="chat", provider=settings.provider, model=settings.model, task=task,
        input_tokens=getattr(usage, "prompt_tokens", None), output_tokens=getattr(usage, "completion_tokens", None),
        response_format=mode, response_format_fallback=fallback,
    )


def _image_usage(response) -> dict | None:
    """Token usage of an Images API answer (gpt-image models report it), for pricing."""
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    return {"input_tokens": getattr(usage, "input_tokens", None), "output_tokens": getattr(usage, "output_tokens", None)}


def _wants_b64_parameter(model: str) -> bool:
    """gpt-image models always answer base64 and reject `response_format`; DALL-E and most
    gateways default to URLs and need it."""
    return not model.startswith(("gpt-image", "chatgpt-image"))


def _as_png(data: bytes) -> bytes:
    """Through the one image intake (scorers.images): format, pixel limits, RGB PNG."""
    return to_png(data, PROVIDER_ANSWER)


class OpenAIImages:
    """ImageProvider over images.generate (no reference) and images.edit (with reference).

    The API has no seed: each call is an independent sample, so metadata records what the
    provider returns (request id, revised prompt) and `seed: None`.
    """

    def __init__(self, settings: ImageSettings, client: openai.AsyncOpenAI | None = None):
        self.settings = settings
        self._client = client or make_client(settings, role="image")
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)

    async def generate(self, prompt: str, *, reference: bytes | None, variation: int) -> GeneratedImage:
        settings = self.settings
        operation = "generate" if reference is None else "edit"
        params: dict = {"model": settings.model, "prompt": prompt, "size": settings.size, "n": 1}
        if settings.quality:
            params["quality"] = settings.quality
        if _wants_b64_parameter(settings.model):
            params["response_format"] = "b64_json"
        attempts = 0

        async def call():
            nonlocal attempts
            attempts += 1
            async with self._semaphore:
                if reference is None:
                    return await self._client.images.generate(**params, timeout=settings.timeout_s)
                return await self._client.images.edit(
                    image=("reference.png", reference, "image/png"), **params, timeout=settings.timeout_s
                )

        what = f"image {operation} ({settings.model}, variation {variation})"
        response = await with_retries(call, settings.retry, what=what)
        item = response.data[0] if response.data else None
        if item is None or not item.b64_json:
            detail = "a URL" if item is not None and item.url else "no image"
            raise ProviderError(
                f"{what}: response carried {detail} instead of base64 image data "
                f"(request {response._request_id}); use a model that returns b64_json",
                retryable=False,
            )
        try:
            data = _as_png(base64.b64decode(item.b64_json))
        except Exception as error:
            raise ProviderError(f"{what}: undecodable image data ({error})") from error
        return GeneratedImage(
            data=data,
            metadata={
                "provider": "openai",
                "model": settings.model,
                "operation": operation,
                "size": settings.size,
                "quality": settings.quality,
                "variation": variation,
                "request_id": response._request_id,
                "revised_prompt": item.revised_prompt,
                "seed": None,
                "reference_used": reference is not None,
                "attempts": attempts,
                "usage": _image_usage(response),
            },
        )
