"""The Gemini image provider through the real google-genai SDK, against tests/fakegemini.py on
loopback (the SDK's base_url option): request shapes, seeds, retries, safety blocks, unknown
models at startup and at call time, and a blocked variation inside a real generation run."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image

from pipeline.storage.objectstore import LocalObjectStore
from pipeline.providers.factory import build_images, check_provider
from pipeline.providers.gemini import GeminiImages, aspect_ratio
from pipeline.providers.offline import OfflineChat, OfflineImages
from pipeline.providers.base import ProviderError
from pipeline.runner import Services, run_generation
from pipeline.schemas import GenerationRequest
from pipeline.settings import ImageSettings, PipelineSettings, RetrySettings
from testkit.doubles import PixelScoring
from tests.fakegemini import FakeGeminiServer, Fault

KEY_ENV = "SCENEREF_TEST_GEMINI_KEY"
MODEL = "gemini-test-image"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=1.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server():
    with FakeGeminiServer(models={MODEL}) as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-gemini-key")
    server.reset()


def settings_for(server: FakeGeminiServer, **overrides) -> ImageSettings:
    options = {
        "provider": "gemini",
        "model": MODEL,
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "size": "512x288",
        "retry": FAST_RETRY,
        "timeout_s": 5.0,
    }
    return ImageSettings(**{**options, **overrides})


@pytest.fixture
async def images(server):
    provider = GeminiImages(settings_for(server, seed=100))
    yield provider
    await provider.aclose()


async def test_text_to_image_sends_prompt_seed_and_ratio_and_records_the_answer(server, images):
    image = await images.generate("a brass desk lamp at dawn", reference=None, variation=2)

    (request,) = server.requests_for("generate")
    assert request.model == MODEL and request.headers["x-goog-api-key"] == "test-gemini-key"
    assert [list(p) for p in request.parts] == [["text"]] and request.text == "a brass desk lamp at dawn"
    config = request.json["generationConfig"]
    assert config["seed"] == 102 and config["candidateCount"] == 1  # base seed + variation
    assert config["responseModalities"] == ["IMAGE"] and config["imageConfig"] == {"aspectRatio": "16:9"}

    assert image.data.startswith(PNG_MAGIC) and Image.open(io.BytesIO(image.data)).size == (128, 72)
    meta = image.metadata
    assert meta["provider"] == "gemini" and meta["model"] == MODEL and meta["model_version"] == f"{MODEL}-fake-001"
    assert meta["request_id"] == request.response_id and meta["finish_reason"] == "STOP"
    assert meta["seed"] == 102 and meta["seed_policy"] == "base+variation" and meta["aspect_ratio"] == "16:9"
    assert meta["operation"] == "generate" and meta["reference_used"] is False and meta["attempts"] == 1
    assert meta["usage"]["output_tokens"] == 1120


async def test_chained_scene_sends_the_reference_as_an_inline_image_part(server, images):
    first = await images.generate("a brass desk lamp at dawn", reference=None, variation=1)
    second = await images.generate("the same lamp at night", reference=first.data, variation=1)

    edit = server.requests_for("generate")[-1]
    assert [list(p) for p in edit.parts] == [["inlineData"], ["text"]]  # image first, then the prompt
    assert edit.inline_mime_types == ["image/png"]
    assert edit.inline_images == [first.data]  # the previous scene's bytes arrive unchanged
    assert second.metadata["operation"] == "edit" and second.metadata["reference_used"] is True
    assert second.data != first.data


async def test_seed_is_sent_and_recorded_and_a_random_one_when_unset(server, images):
    again = GeminiImages(settings_for(server, seed=100))
    try:
        a = await images.generate("a lamp", reference=None, variation=3)
        b = await again.generate("a lamp", reference=None, variation=3)
    finally:
        await again.aclose()
    assert a.metadata["seed"] == b.metadata["seed"] == 103 and a.data == b.data  # the fake honours seeds

    unseeded = GeminiImages(settings_for(server, seed=None))
    try:
        drawn = [await unseeded.generate("a lamp", reference=None, variation=v) for v in (1, 2)]
    finally:
        await unseeded.aclose()
    sent = [r.json["generationConfig"]["seed"] for r in server.requests_for("generate")[-2:]]
    assert [d.metadata["seed"] for d in drawn] == sent and sent[0] != sent[1]
    assert all(d.metadata["seed_policy"] == "random" for d in drawn)


async def test_429_waits_for_retry_after_then_succeeds(server, images, caplog):
    server.add_faults(Fault("429", retry_after=0.3))
    with caplog.at_level(logging.WARNING, logger="sceneref.providers"):
        image = await images.generate("a lamp", reference=None, variation=1)
    assert image.metadata["attempts"] == 2
    assert [r.fault for r in server.requests_for("generate")] == ["429", None]
    assert "HTTP 429" in caplog.text and "retrying in 0.30s (Retry-After)" in caplog.text


async def test_5xx_are_retried_then_succeed(server, images):
    server.add_faults("500", "503")
    image = await images.generate("a lamp", reference=None, variation=1)
    assert image.metadata["attempts"] == 3 and image.data.startswith(PNG_MAGIC)


async def test_a_timeout_is_retried_and_exhausted_timeouts_fail_retryably(server):
    provider = GeminiImages(settings_for(server, timeout_s=0.5, retry=RetrySettings(max_attempts=2, initial_delay_s=0.01)))
    try:
        server.add_faults(Fault("timeout", sleep_s=2.0))
        image = await provider.generate("a lamp", reference=None, variation=1)
        assert image.metadata["attempts"] == 2

        server.add_faults(Fault("timeout", sleep_s=2.0), Fault("timeout", sleep_s=2.0))
        with pytest.raises(ProviderError, match="after 2 attempts.*timed out") as failed:
            await provider.generate("a lamp", reference=None, variation=2)
        assert failed.value.retryable is True
    finally:
        await provider.aclose()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault("blocked_candidate"), "finish_reason IMAGE_SAFETY"),
        (Fault("blocked_candidate", reason="PROHIBITED_CONTENT"), "finish_reason PROHIBITED_CONTENT"),
        (Fault("blocked_prompt"), "block_reason SAFETY"),
    ],
)
async def test_a_safety_block_fails_at_once_naming_the_reason(server, images, fault, reason):
    server.add_faults(fault)
    with pytest.raises(ProviderError, match=reason) as blocked:
        await images.generate("a lamp", reference=None, variation=1)
    assert blocked.value.retryable is False and "not retried" in str(blocked.value)
    assert len(server.requests_for("generate")) == 1  # a block is not paid for twice


async def test_with_two_candidates_a_blocked_one_is_recorded_and_the_other_kept(server):
    provider = GeminiImages(settings_for(server, candidate_count=2))
    try:
        server.add_faults("blocked_candidate")
        image = await provider.generate("a lamp", reference=None, variation=1)
    finally:
        await provider.aclose()
    assert server.requests_for("generate")[0].json["generationConfig"]["candidateCount"] == 2
    assert image.metadata["candidate_finish_reasons"] == ["IMAGE_SAFETY", "STOP"]
    assert image.metadata["finish_reason"] == "STOP" and image.data.startswith(PNG_MAGIC)


async def test_an_answer_without_an_image_is_retried_and_bad_bytes_are_refused(server, images):
    server.add_faults("no_image")
    image = await images.generate("a lamp", reference=None, variation=1)
    assert image.metadata["attempts"] == 2

    server.add_faults("malformed_image")
    with pytest.raises(ProviderError, match="undecodable image data"):
        await images.generate("a lamp", reference=None, variation=2)


async def test_check_reports_the_model_and_an_unknown_model_names_the_setting(server, images):
    found = await check_provider(images)
    assert found["model"] == MODEL and found["display_name"] == f"Fake {MODEL}" and found["version"] == "001"

    retired = GeminiImages(settings_for(server, model="gemini-2.5-flash-image"))
    try:
        for attempt in (retired.check(), retired.generate("a lamp", reference=None, variation=1)):
            with pytest.raises(ProviderError) as unknown:
                await attempt
            message = str(unknown.value)
            assert unknown.value.retryable is False and unknown.value.status_code == 404
            assert "'gemini-2.5-flash-image'" in message and "pipeline.images.model" in message
            assert "is not found for API version" in message  # the vendor's own words
    finally:
        await retired.aclose()
    assert [r.call for r in server.requests if r.model == "gemini-2.5-flash-image"] == ["get", "generate"]


def test_settings_defaults_key_fallback_and_aspect_ratio(monkeypatch, server):
    chosen = ImageSettings(provider="gemini")
    assert chosen.model == ImageSettings.PROVIDER_DEFAULTS["gemini"]["model"] and chosen.api_key_env == "GEMINI_API_KEY"
    assert ImageSettings(provider="gemini", model="mine").model == "mine"
    assert ImageSettings().model != chosen.model and ImageSettings().api_key_env == "OPENAI_API_KEY"
    assert [aspect_ratio(ImageSettings(size=s)) for s in ("1536x1024", "1920x1080", "1024x1024", "1000x430")] == [
        "3:2", "16:9", "1:1", "21:9"]
    assert aspect_ratio(ImageSettings(size="1536x1024", aspect_ratio="4:5")) == "4:5"

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ProviderError, match="GEMINI_API_KEY.*GOOGLE_API_KEY.*--offline"):
        GeminiImages(ImageSettings(provider="gemini"))
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google-env")
    assert isinstance(build_images(ImageSettings(provider="gemini", base_url=server.base_url)), GeminiImages)
    assert isinstance(build_images(ImageSettings(provider="offline")), OfflineImages)


async def test_a_blocked_variation_is_recorded_and_the_generation_goes_on(server, tmp_path):
    settings = PipelineSettings.offline(output=tmp_path)
    settings = settings.model_copy(update={"images": settings_for(server, seed=1)})
    images = GeminiImages(settings.images)
    services = Services(chat=OfflineChat(), images=images, scoring=PixelScoring(), artifacts=LocalObjectStore(settings.artifacts_dir))
    server.add_faults(Fault("blocked_candidate", reason="IMAGE_SAFETY"))
    request = GenerationRequest(prompt="A launch video for Aurora, a smart desk lamp", target_duration=9, advanced_image_num_variations=2)
    try:
        scenes = await run_generation("gen-gemini-blocked", request, services, settings)
    finally:
        await images.aclose()

    assert len(scenes) == 3
    failed = [v for v in scenes[0].variations if v.error]
    assert len(failed) == 1 and "IMAGE_SAFETY" in failed[0].error and failed[0].image_key is None
    kept = [v for v in scenes[0].variations if not v.error]
    assert scenes[0].selected_variation == kept[0].variation
    assert kept[0].provider_metadata["provider"] == "gemini" and kept[0].provider_metadata["seed"] == 1 + kept[0].variation
    requests = server.requests_for("generate")
    assert len(requests) == 3 * 2  # the blocked one was not retried
    assert sum(1 for r in requests if r.inline_images) == 2 * 2  # scenes 2 and 3 chain on a reference
