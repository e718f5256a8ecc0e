"""Provider clients driven through the real `openai` client against the fake server, the retry
policy, and the offline provider pair."""

from __future__ import annotations

import asyncio
import io
import json
import re
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image

from pipeline.providers.factory import build_chat, build_images, build_providers
from pipeline.providers.offline import OfflineChat, OfflineImages, render_offline_image
from pipeline.providers.openai_clients import OpenAIChat, OpenAIImages
from pipeline.providers.base import ProviderError
from pipeline.providers.retry import backoff_delay, parse_retry_after, with_retries
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings, RetrySettings
from testkit.doubles import FakeOpenAIServer, Fault

KEY_ENV = "SCENEREF_TEST_OPENAI_KEY"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=1.0)
WEIGHTS = {"completeness": 0.25, "specificity": 0.25, "professionalism": 0.20, "cinematography": 0.15, "brand_alignment": 0.15}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STORY = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(request, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    if "server" in request.fixturenames:
        fake = request.getfixturevalue("server")
        fake.reset()
        fake.chat_latency_s = fake.image_latency_s = 0.0


def chat_for(server: FakeOpenAIServer, **overrides) -> OpenAIChat:
    options = {"base_url": server.base_url, "api_key_env": KEY_ENV, "retry": FAST_RETRY, "timeout_s": 5.0}
    return OpenAIChat(LLMSettings(**{**options, **overrides}))


def images_for(server: FakeOpenAIServer, **overrides) -> OpenAIImages:
    options = {
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "retry": FAST_RETRY,
        "timeout_s": 5.0,
        "size": "128x72",
    }
    return OpenAIImages(ImageSettings(**{**options, **overrides}))


def user(payload: dict) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are an agent. Answer JSON."}, {"role": "user", "content": json.dumps(payload)}]


STORYBOARD_INPUT = user({"prompt": STORY, "scene_count": 4, "durations": [4, 4, 4, 3]})


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


# --- OpenAI clients against the fake server ---------------------------------------------------


async def test_chat_sends_the_reply_schema_and_returns_content(server):
    chat = chat_for(server, model="test-chat", temperature=0.3)
    reply = json.loads(await chat.complete(STORYBOARD_INPUT, task="storyboard"))
    assert len(reply["scenes"]) == 4
    (request,) = server.requests_for("chat")
    assert request.json["model"] == "test-chat"
    assert request.json["temperature"] == 0.3
    assert request.json["response_format"]["type"] == "json_schema"  # structured outputs by default
    assert request.json["response_format"]["json_schema"]["name"] == "StoryboardOutput"
    assert request.headers["authorization"] == "Bearer test-key"


async def test_no_temperature_is_sent_unless_one_is_set(server):
    """The current default models reason and refuse a sampling temperature (docs/providers.md)."""
    chat = chat_for(server, model="test-chat")
    await chat.complete(STORYBOARD_INPUT, task="storyboard")
    (request,) = server.requests_for("chat")
    assert "temperature" not in request.json


async def test_generate_without_reference_edit_with_reference(server):
    images = images_for(server)
    first = await images.generate("a lamp on a desk", reference=None, variation=0)
    second = await images.generate("the lamp at night", reference=first.data, variation=1)

    (generation,) = server.requests_for("generations")
    (edit,) = server.requests_for("edits")
    assert generation.json["prompt"] == "a lamp on a desk" and generation.json["n"] == 1
    assert generation.json["size"] == "128x72" and generation.json["quality"] == "medium"
    assert "response_format" not in generation.json  # gpt-image models reject it
    assert edit.image == first.data  # the chained scene carries the previous image
    assert edit.form["prompt"] == "the lamp at night" and edit.form["model"] == "gpt-image-2"

    for image, request, operation in ((first, generation, "generate"), (second, edit, "edit")):
        assert image.data.startswith(PNG_MAGIC)
        assert Image.open(io.BytesIO(image.data)).size == (128, 72)
        meta = image.metadata
        assert meta["provider"] == "openai" and meta["model"] == "gpt-image-2" and meta["size"] == "128x72"
        assert meta["request_id"] == request.request_id
        assert meta["operation"] == operation and meta["seed"] is None and meta["attempts"] == 1
        assert meta["revised_prompt"].endswith("(revised)")
    assert second.metadata["reference_used"] and not first.metadata["reference_used"]


async def test_dall_e_models_ask_for_base64(server):
    await images_for(server, model="dall-e-3", quality=None).generate("a lamp", reference=None, variation=0)
    (request,) = server.requests_for("generations")
    assert request.json["response_format"] == "b64_json" and "quality" not in request.json


async def test_429_honours_retry_after(server):
    server.add_faults("chat", Fault("429", retry_after=0.3))
    await asyncio.wait_for(chat_for(server).complete(STORYBOARD_INPUT, task="storyboard"), 30)  # a bound, not a figure
    limited, answered = server.requests_for("chat")
    assert (limited.fault, answered.fault) == ("429", None)
    assert answered.started - limited.started >= 0.3  # backoff alone would have waited 0.01 s


async def test_retry_after_is_capped_at_max_delay(server):
    server.add_faults("chat", Fault("429", retry_after=60))
    retry = RetrySettings(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.1)
    assert backoff_delay(1, retry, 60.0) == 0.1
    # Uncapped, the retry would wait the server's 60 s: the bound fails it long before that.
    await asyncio.wait_for(chat_for(server, retry=retry).complete(STORYBOARD_INPUT, task="storyboard"), 30)
    assert len(server.requests_for("chat")) == 2


async def test_500s_are_retried_and_counted(server, caplog):
    server.add_faults("generations", "500", "500")
    with caplog.at_level("WARNING", logger="sceneref.providers"):
        image = await images_for(server).generate("a lamp", reference=None, variation=2)
    assert image.metadata["attempts"] == 3
    assert image.metadata["request_id"] == server.requests_for("generations")[-1].request_id
    assert sum("retrying" in record.message for record in caplog.records) == 2


async def test_timeout_then_success(server):
    server.add_faults("edits", Fault("timeout", sleep_s=1.5))
    reference = render_offline_image("ref", variation=0, reference=None, size=(64, 36))[0]
    image = await images_for(server, timeout_s=0.3).generate("a lamp", reference=reference, variation=0)
    assert image.metadata["attempts"] == 2
    assert [r.fault for r in server.requests_for("edits")] == ["timeout", None]


async def test_400_fails_fast_with_server_message(server):
    server.add_faults("chat", Fault("400", message="Invalid value for 'model'"))
    with pytest.raises(ProviderError) as caught:
        await chat_for(server).complete(STORYBOARD_INPUT, task="storyboard")
    assert caught.value.status_code == 400 and not caught.value.retryable
    assert "Invalid value for 'model'" in str(caught.value)
    assert len(server.requests_for("chat")) == 1


async def test_exhausted_retries_name_attempts(server):
    server.add_faults("generations", "500", "500", "500")
    with pytest.raises(ProviderError) as caught:
        await images_for(server).generate("a lamp", reference=None, variation=0)
    assert caught.value.retryable and caught.value.status_code == 500
    assert "after 3 attempts" in str(caught.value) and "image generate" in str(caught.value)
    assert len(server.requests_for("generations")) == 3


async def test_concurrency_limit_is_respected(server):
    server.image_latency_s = 0.15
    server.chat_latency_s = 0.15
    images = images_for(server, max_concurrency=2)
    chat = chat_for(server, max_concurrency=3)
    await asyncio.gather(
        *(images.generate(f"lamp {i}", reference=None, variation=i) for i in range(6)),
        *(chat.complete(STORYBOARD_INPUT, task="storyboard") for _ in range(7)),
    )
    assert server.max_in_flight["generations"] == 2
    assert server.max_in_flight["chat"] == 3


async def test_malformed_outputs(server):
    server.add_faults("chat", "malformed", "malformed_schema")
    chat = chat_for(server)
    with pytest.raises(json.JSONDecodeError):  # validating JSON is the agents' job
        json.loads(await chat.complete(STORYBOARD_INPUT, task="storyboard"))
    assert "scenes" not in json.loads(await chat.complete(STORYBOARD_INPUT, task="storyboard"))

    server.add_faults("generations", "malformed")
    with pytest.raises(ProviderError, match="instead of base64"):
        await images_for(server).generate("a lamp", reference=None, variation=0)


def test_missing_api_key_names_the_env_var(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    for make, settings in ((OpenAIChat, LLMSettings), (OpenAIImages, ImageSettings)):
        with pytest.raises(ProviderError, match=f"{KEY_ENV}.*--offline"):
            make(settings(api_key_env=KEY_ENV))


def test_factory_picks_providers(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    chat, images = build_providers(PipelineSettings.offline())
    assert isinstance(chat, OfflineChat) and isinstance(images, OfflineImages)
    mixed = PipelineSettings.offline().model_copy(
        update={"images": ImageSettings(provider="openai", api_key_env=KEY_ENV)}
    )
    with pytest.raises(ProviderError, match=KEY_ENV):
        build_providers(mixed)


# --- retry helper ------------------------------------------------------------------------------


def test_retry_after_parsing_and_backoff():
    retry = RetrySettings(initial_delay_s=0.5, multiplier=2, max_delay_s=3)
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < parse_retry_after({"retry-after": future}) <= 30
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None
    assert [backoff_delay(attempt, retry) for attempt in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff_delay(1, retry, retry_after_s=10) == 3


async def test_bugs_are_not_retried():
    calls = 0

    async def broken():
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await with_retries(broken, FAST_RETRY, what="test")
    assert calls == 1


# --- offline providers ---------------------------------------------------------------------------


async def ask(payload: dict, task: str) -> dict:
    return json.loads(await OfflineChat().complete(user(payload), task=task))


async def run_loop(scene_prompt: str, story: str, max_iterations: int = 4) -> list[float]:
    """The agents' loop in miniature; the overall is computed here from the dimension scores."""
    previous = critique = None
    improvements: list[str] = []
    overalls: list[float] = []
    for iteration in range(1, max_iterations + 1):
        base = {"scene_prompt": scene_prompt, "story_prompt": story, "iteration": iteration}
        rewrite = {**base, "previous_prompt": previous, "critique": critique, "improvements": improvements}
        enhanced = (await ask(rewrite, "cinematographer"))["enhanced_prompt"]
        review = await ask({**base, "enhanced_prompt": enhanced}, "prompt_engineer")
        overalls.append(sum(WEIGHTS[name] * review["scores"][name] for name in WEIGHTS))
        previous, critique, improvements = enhanced, review["critique"], review["improvements"]
        if overalls[-1] >= 85:
            break
    return overalls


async def test_offline_chat_is_deterministic_and_plans_distinct_scenes():
    chat = OfflineChat()
    first = await chat.complete(STORYBOARD_INPUT, task="storyboard")
    assert first == await OfflineChat().complete(STORYBOARD_INPUT, task="storyboard")
    scenes = [scene["description"] for scene in json.loads(first)["scenes"]]
    assert len(scenes) == 4 and len(set(scenes)) == 4
    assert all("Aurora" in scene for scene in scenes)
    many = await ask({"prompt": STORY, "scene_count": 10, "durations": []}, "storyboard")
    assert len({scene["description"] for scene in many["scenes"]}) == 10


@pytest.mark.parametrize(
    "story",
    [STORY, "Kestrel Roasters coffee: morning ritual, fresh beans, cosy kitchen", "Electric bike commuting at night"],
)
async def test_offline_loop_improves_to_approval(story):
    scenes = (await ask({"prompt": story, "scene_count": 6, "durations": []}, "storyboard"))["scenes"]
    for scene in scenes:
        overalls = await run_loop(scene["description"], story)
        assert 70 <= overalls[0] <= 80, overalls
        assert 2 <= len(overalls) <= 3 and overalls[-1] >= 85, overalls
        assert overalls == sorted(overalls)


async def test_cinematographer_answers_the_critique():
    base = {"scene_prompt": "A lamp on an oak desk at dusk", "story_prompt": STORY}
    first = await ask({**base, "iteration": 1, "previous_prompt": None, "critique": None, "improvements": []}, "cinematographer")
    first_prompt = first["enhanced_prompt"]
    assert first_prompt.startswith("A lamp on an oak desk at dusk, ")
    assert not re.search(r"\d{4}K", first_prompt)
    review = await ask({**base, "iteration": 1, "enhanced_prompt": first_prompt}, "prompt_engineer")
    assert "colour temperature" in review["critique"] and review["improvements"]

    fix = {"critique": "Needs warmth.", "improvements": ["Give the colour temperature in Kelvin"]}
    second = await ask({**base, "iteration": 2, "previous_prompt": first_prompt, **fix}, "cinematographer")
    assert re.search(r"\d{4}K", second["enhanced_prompt"])
    assert all(clause in second["enhanced_prompt"] for clause in first_prompt.rstrip(".").split(", "))


async def test_review_penalises_losing_the_scene():
    scene = "A ceramic teapot steaming beside an open window in the morning"
    faithful = (await ask({"scene_prompt": scene, "story_prompt": STORY}, "cinematographer"))["enhanced_prompt"]
    drifted = faithful.replace(scene, "A product")
    reviews = [
        await ask({"scene_prompt": scene, "story_prompt": STORY, "enhanced_prompt": text, "iteration": 1}, "prompt_engineer")
        for text in (faithful, drifted)
    ]
    assert reviews[1]["scores"]["completeness"] < reviews[0]["scores"]["completeness"] - 10
    assert "lost what the scene is about" in reviews[1]["improvements"][0]


async def test_offline_images_depend_on_prompt_variation_and_reference():
    images = OfflineImages(ImageSettings(provider="offline", model="offline-procedural", size="512x288"))
    base = await images.generate("a lamp on a desk", reference=None, variation=0)
    again = await images.generate("a lamp on a desk", reference=None, variation=0)
    assert base.data == again.data and base.metadata == again.metadata
    assert Image.open(io.BytesIO(base.data)).size == (512, 288)
    assert base.metadata["provider"] == "offline" and base.metadata["model"] == "offline-procedural"
    assert isinstance(base.metadata["seed"], int) and base.metadata["reference_used"] is False

    other_prompt = await images.generate("a red bicycle in the rain", reference=None, variation=0)
    other_variation = await images.generate("a lamp on a desk", reference=None, variation=1)
    assert other_variation.metadata["seed"] != base.metadata["seed"]
    for different in (other_prompt, other_variation):
        assert np.abs(pixels(different.data) - pixels(base.data)).mean() > 5

    reference = other_prompt.data
    chained = await images.generate("a lamp on a desk", reference=reference, variation=0)
    assert chained.metadata["reference_used"] is True
    assert chained.data == (await images.generate("a lamp on a desk", reference=reference, variation=0)).data
    # Blended toward the reference: closer to it than the unreferenced image is.
    ref_pixels = pixels(reference)
    assert np.abs(pixels(chained.data) - ref_pixels).mean() < np.abs(pixels(base.data) - ref_pixels).mean()


def test_factory_builds_one_side_without_the_others_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    assert isinstance(build_images(ImageSettings(provider="offline")), OfflineImages)
    assert isinstance(build_chat(LLMSettings(provider="offline")), OfflineChat)
