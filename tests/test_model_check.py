"""Model ids the vendor does not serve (providers): the OpenAI-compatible providers' startup check
(models.retrieve) and their call-time answer, through the real `openai` client against the
FakeOpenAIServer with a `models/{id}` route; and the LLM on Gemini's OpenAI-compatible endpoint.
The Gemini image provider's own check is in tests/test_gemini.py."""

from __future__ import annotations

import logging

import pytest
from fastapi import Request
from fastapi.responses import JSONResponse

from pipeline.providers.factory import build_chat, build_images, check_provider
from pipeline.providers.modelcheck import CheckedOpenAIChat, CheckedOpenAIImages
from pipeline.providers.offline import OfflineChat
from pipeline.providers.base import ProviderError
from pipeline.settings import ImageSettings, LLMSettings, RetrySettings
from testkit.doubles import FakeOpenAIServer

KEY_ENV = "SCENEREF_TEST_MODELS_KEY"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.1)
SERVED = {"gpt-image-2": None, "gpt-4o-mini": "2027-01-14", "gemini-3.5-flash": None}
MESSAGES = [
    {"role": "system", "content": "Plan a storyboard. Answer JSON."},
    {"role": "user", "content": '{"prompt": "A lamp that wakes you gently", "scene_count": 3}'},
]


def _not_found(model: str) -> JSONResponse:
    message = f"The model `{model}` does not exist or you do not have access to it."
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
    return JSONResponse(body, status_code=404)


@pytest.fixture(scope="module")
def server():
    """The OpenAI double plus what OpenAI answers for models: `GET /v1/models/{id}` (with the
    optional shutdown_date), and a 404 model_not_found on calls while `retired` is on."""
    fake = FakeOpenAIServer()
    fake.retired = False

    async def retrieve(model: str):
        if model not in SERVED:
            return _not_found(model)
        return {"id": model, "object": "model", "created": 1767225600, "owned_by": "system", "shutdown_date": SERVED[model]}

    fake.app.add_api_route("/v1/models/{model}", retrieve, methods=["GET"])

    @fake.app.middleware("http")
    async def retired_models(request: Request, call_next):
        if fake.retired and request.url.path.endswith(("/images/generations", "/images/edits", "/chat/completions")):
            return _not_found("retired-model")
        return await call_next(request)

    with fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    server.retired = False


def images(server, model: str) -> CheckedOpenAIImages:
    return build_images(ImageSettings(base_url=server.base_url, api_key_env=KEY_ENV, model=model, retry=FAST_RETRY, size="64x36"))


def chat(server, model: str) -> CheckedOpenAIChat:
    return build_chat(LLMSettings(base_url=server.base_url, api_key_env=KEY_ENV, model=model, retry=FAST_RETRY))


async def test_check_reports_the_model_and_warns_of_a_shutdown_date(server, caplog):
    assert (await check_provider(images(server, "gpt-image-2")))["shutdown_date"] is None
    with caplog.at_level(logging.WARNING, logger="sceneref.providers"):
        found = await check_provider(chat(server, "gpt-4o-mini"))
    assert found == {"provider": "openai", "model": "gpt-4o-mini", "owned_by": "system", "shutdown_date": "2027-01-14"}
    assert "shuts down on 2027-01-14" in caplog.text and "pipeline.llm.model" in caplog.text
    assert await check_provider(OfflineChat()) is None


def test_the_factory_builds_each_image_provider_by_name():
    """diffusers is built from its own settings (in this process; under Serve its deployment)."""
    from scorers.base import ModelNotFoundError

    # Routed to the diffusers loader, which says how to provide weights it cannot find offline.
    with pytest.raises(ModelNotFoundError, match=r"diffusion model not found: 'some/model'.*save_pretrained"):
        build_images(ImageSettings(provider="diffusers", diffusion={"model": "some/model", "steps": 2}))


@pytest.mark.parametrize(("make", "setting"), [(images, "pipeline.images.model"), (chat, "pipeline.llm.model")])
async def test_an_unknown_model_fails_the_check_with_the_vendor_message_and_the_setting(server, make, setting):
    provider = make(server, "gpt-image-1")
    with pytest.raises(ProviderError) as unknown:
        await provider.check()
    message = str(unknown.value)
    assert unknown.value.retryable is False and unknown.value.status_code == 404
    assert "'gpt-image-1'" in message and setting in message
    assert "does not exist or you do not have access to it" in message  # the vendor's own words


async def test_a_model_retired_at_call_time_is_not_retried_and_names_the_setting(server):
    server.retired = True
    with pytest.raises(ProviderError, match=r"'gpt-image-2'.*pipeline\.images\.model") as failed:
        await images(server, "gpt-image-2").generate("a lamp", reference=None, variation=1)
    assert failed.value.retryable is False and failed.value.status_code == 404
    with pytest.raises(ProviderError, match=r"'gpt-4o-mini'.*does not exist.*pipeline\.llm\.model"):
        await chat(server, "gpt-4o-mini").complete(MESSAGES, task="storyboard")
    assert len(server.requests_for("generations")) == 0  # the middleware answered; nothing retried
    server.retired = False
    assert (await images(server, "gpt-image-2").generate("a lamp", reference=None, variation=1)).data


async def test_llm_on_gemini_is_the_openai_client_on_googles_compatible_endpoint(server, monkeypatch):
    defaults = LLMSettings(provider="gemini")
    assert defaults.base_url == "https://generativelanguage.googleapis.com/v1beta/openai/"
    assert defaults.api_key_env == "GEMINI_API_KEY" and defaults.model == "gemini-3.5-flash"
    assert LLMSettings(provider="gemini", model="gemini-3.6-flash").model == "gemini-3.6-flash"

    gemini = build_chat(LLMSettings(provider="gemini", base_url=server.base_url, api_key_env=KEY_ENV, retry=FAST_RETRY))
    assert isinstance(gemini, CheckedOpenAIChat)
    assert (await gemini.check())["model"] == "gemini-3.5-flash"
    text = await gemini.complete(MESSAGES, task="storyboard")
    (request,) = server.requests_for("chat")
    assert request.json["model"] == "gemini-3.5-flash" and request.json["response_format"] == {"type": "json_object"}
    assert request.headers["authorization"] == "Bearer test-key" and text.startswith("{")

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(ProviderError, match="GEMINI_API_KEY"):
        build_chat(LLMSettings(provider="gemini"))
