"""ImageProvider on Google's own SDK (`google-genai`): Gemini's native image models ("Nano Banana").

Why the native SDK rather than an OpenAI-shaped gateway: the guide generates with these models,
and only generateContent takes what the guide needs, an input image part for chained scenes,
the aspect ratio, a candidate count and a (best-effort) seed.

- No reference: text-to-image. With a reference: [image part, text part] in one user turn, so
  the previous scene's selected image conditions the next.
- The seed is sent in generationConfig and recorded in the metadata with the model, the finish
  reason and the response id. Gemini documents its seed as best-effort: the same seed may still
  give a different image, so it is provenance, not a reproducibility promise.
- Retries are ours (pipeline.providers.retry), the SDK's are off (attempts=1), as with the openai client:
  429 waits for Retry-After, 5xx and timeouts back off, and the attempts are counted.
- A prompt or image the safety filters block is a non-retryable ProviderError naming the block
  reason: the runner records it as that variation's error and the scene goes on with the others.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets

import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from scorers.images import PROVIDER_ANSWER, sniff_image_type, to_png

from pipeline.providers.modelcheck import IMAGE_MODEL_SETTING, unknown_model
from pipeline.providers.base import GeneratedImage, ProviderError
from pipeline.providers.retry import RETRYABLE_STATUS, Failure, classify, parse_retry_after, with_retries
from pipeline.settings import ImageSettings

try:  # the SDK's async transport when installed (Ray brings it); httpx otherwise
    import aiohttp
except ImportError:  # pragma: no cover - depends on the environment
    aiohttp = None

# The ratios generateContent's imageConfig documents for the image models; `size` maps to the nearest.
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# Finish reasons that mean "withheld by policy": retrying the same prompt would be refused again.
BLOCKED = frozenset(
    {"SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_RECITATION"}
)
PROVIDER = "gemini"


def _name(value: object) -> str | None:
    """An SDK enum (or a string the SDK did not know) as its API name."""
    return None if value is None else str(getattr(value, "value", value))


def aspect_ratio(settings: ImageSettings) -> str:
    """`aspect_ratio` when set, else the documented ratio nearest to `size` (1536x1024 -> 3:2)."""
    if settings.aspect_ratio:
        return settings.aspect_ratio
    width, height = settings.dimensions
    target = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda r: abs(math.log(int(r.split(":")[0]) / int(r.split(":")[1])) - target))


def api_key(settings: ImageSettings) -> str:
    """The key from `api_key_env`; with the default GEMINI_API_KEY unset, GOOGLE_API_KEY (the
    SDK's own fallback) is taken too. Fails early, naming what to set."""
    key = settings.api_key()
    if not key and settings.api_key_env == "GEMINI_API_KEY":
        key = os.environ.get("GOOGLE_API_KEY")
    if not key:
        also = " (or GOOGLE_API_KEY)" if settings.api_key_env == "GEMINI_API_KEY" else ""
        raise ProviderError(
            f"No API key for the gemini image provider: set the {settings.api_key_env}{also} environment "
            f"variable, or run with --offline to use the offline demo providers."
        )
    return key


def make_client(settings: ImageSettings) -> genai.Client:
    """A Gemini Developer API client: our timeout, no SDK retries, `base_url` for a gateway."""
    options = types.HttpOptions(
        base_url=settings.base_url,
        timeout=int(settings.timeout_s * 1000),  # the SDK takes milliseconds
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(vertexai=False, api_key=api_key(settings), http_options=options)


class GeminiImages:
    """ImageProvider over models.generate_content with image output."""

    def __init__(self, settings: ImageSettings, client: genai.Client | None = None):
        self.settings = settings
        self._client = client or make_client(settings)
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)

    def classify(self, error: BaseException) -> Failure | None:
        """SDK and transport errors in pipeline.providers.retry's terms; a 404 names the model setting."""
        if isinstance(error, genai_errors.APIError):
            code = error.code
            retryable = code in RETRYABLE_STATUS or (code or 0) >= 500
            message = error.message or error.status or str(error)
            if code == 404:
                message = unknown_model(message, provider=PROVIDER, model=self.settings.model, setting=IMAGE_MODEL_SETTING)
            headers = getattr(error.response, "headers", None)
            return Failure(retryable, message, code, parse_retry_after(headers) if retryable else None)
        if isinstance(error, TimeoutError) or isinstance(error, httpx.TimeoutException):
            return Failure(True, "request timed out")
        if (aiohttp is not None and isinstance(error, aiohttp.ClientError)) or isinstance(error, httpx.TransportError):
            return Failure(True, f"connection error: {error}")
        return classify(error)

    async def check(self) -> dict:
        """models.get for the configured id, at replica start: a retired or unknown id fails
        here with Google's message and the setting to change."""
        settings = self.settings

        async def call():
            return await self._client.aio.models.get(model=settings.model)

        found = await with_retries(call, settings.retry, what=f"model check ({settings.model})", classify_error=self.classify)
        actions = list(found.supported_actions or [])
        if actions and "generateContent" not in actions:
            raise ProviderError(
                f"gemini model {settings.model!r} does not generate content (it supports {', '.join(actions)}); "
                f"set {IMAGE_MODEL_SETTING} to an image model (docs/providers.md)",
                retryable=False,
            )
        return {"provider": PROVIDER, "model": settings.model, "name": found.name, "display_name": found.display_name, "version": found.version}

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    async def generate(self, prompt: str, *, reference: bytes | None, variation: int) -> GeneratedImage:
        settings = self.settings
        operation = "generate" if reference is None else "edit"
        what = f"image {operation} ({settings.model}, variation {variation})"
        # One seed per variation, kept across retries, so the recorded seed is the one that answered.
        seed = settings.seed + variation if settings.seed is not None else secrets.randbelow(2**31)
        ratio = aspect_ratio(settings)
        config = types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            candidate_count=settings.candidate_count,
            seed=seed,
            image_config=types.ImageConfig(aspect_ratio=ratio, image_size=settings.image_size),
        )
        parts = [types.Part.from_text(text=prompt)]
        if reference is not None:
            kind = (sniff_image_type(reference[:16]) or "PNG").lower()
            parts.insert(0, types.Part.from_bytes(data=reference, mime_type=f"image/{kind}"))
        contents = [types.Content(role="user", parts=parts)]
        attempts = 0

        async def call():
            nonlocal attempts
            attempts += 1
            async with self._semaphore:
                response = await self._client.aio.models.generate_content(model=settings.model, contents=contents, config=config)
            return response, _pick_image(response, what)

        response, (candidate, blob, reasons) = await with_retries(call, settings.retry, what=what, classify_error=self.classify)
        try:
            data = to_png(blob.data, PROVIDER_ANSWER)  # the one image intake: format, pixel limits, RGB PNG
        except Exception as error:
            raise ProviderError(f"{what}: undecodable image data ({error}) (response {response.response_id})") from error
        usage = response.usage_metadata
        return GeneratedImage(
            data=data,
            metadata={
                "provider": PROVIDER,
                "model": settings.model,
                "model_version": response.model_version,
                "operation": operation,
                "aspect_ratio": ratio,
                "image_size": settings.image_size,
                "variation": variation,
                "request_id": response.response_id,
                "finish_reason": _name(candidate.finish_reason),
                "candidate_finish_reasons": reasons,
                "seed": seed,
                "seed_policy": "base+variation" if settings.seed is not None else "random",
                "mime_type": blob.mime_type,
                "reference_used": reference is not None,
                "attempts": attempts,
                "usage": None if usage is None else {
                    "prompt_tokens": usage.prompt_token_count,
                    "output_tokens": usage.candidates_token_count,
                    "total_tokens": usage.total_token_count,
                },
            },
        )


def _pick_image(response: types.GenerateContentResponse, what: str):
    """The first candidate with an image part, its blob and every candidate's finish reason.

    A blocked prompt or an answer whose only reasons are blocks raises a non-retryable
    ProviderError naming the reason; an answer with no image for another reason (text only,
    NO_IMAGE, OTHER) is a retryable one, since another sample may draw an image."""
    rid = response.response_id
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        detail = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
        raise ProviderError(
            f"{what}: the prompt was blocked by Gemini's safety filters (block_reason {_name(feedback.block_reason)}{detail}) "
            f"(response {rid}); not retried",
            retryable=False,
        )
    reasons = [_name(c.finish_reason) for c in response.candidates or []]
    for candidate in response.candidates or []:
        for part in (candidate.content.parts if candidate.content and candidate.content.parts else []):
            if part.inline_data is not None and part.inline_data.data:
                return candidate, part.inline_data, reasons
    blocked = [c for c in response.candidates or [] if _name(c.finish_reason) in BLOCKED]
    if blocked:
        message = f": {blocked[0].finish_message}" if blocked[0].finish_message else ""
        raise ProviderError(
            f"{what}: Gemini withheld the image (finish_reason {_name(blocked[0].finish_reason)}{message}) "
            f"(response {rid}); not retried",
            retryable=False,
        )
    text = " ".join(p.text for c in response.candidates or [] if c.content and c.content.parts for p in c.content.parts if p.text)
    raise ProviderError(
        f"{what}: the answer carried no image (finish reasons {reasons or 'none'}"
        f"{'; text: ' + repr(text[:200]) if text else ''}) (response {rid})",
        retryable=True,
    )
