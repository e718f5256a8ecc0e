"""Structured outputs: each chat request carries its task's reply schema in the strict form
(`response_format` of type `json_schema`), built from the pydantic models; an endpoint that
refuses it is asked again in JSON mode once, and the log and traces say so. Driven through the
real `openai` client against the OpenAI-compatible double, which checks a strict schema as
OpenAI does."""

from __future__ import annotations

import json
import logging

import jsonschema
import pytest
from pydantic import BaseModel

from pipeline.providers.offline import offline_reply
from pipeline.providers.openai_clients import OpenAIChat
from pipeline.providers.base import ProviderError
from pipeline.runner import run_generation
from pipeline.schemas import CinematographerOutput, PromptReview, StoryboardOutput
from pipeline.settings import LLMSettings, RetrySettings
from pipeline.structured import TASK_SCHEMAS, ask_json, strict_schema
from pipeline.telemetry import collect
from testkit.doubles import FakeOpenAIServer, Fault, strict_schema_problems
from tests.test_runner import make_services, make_settings, new_id, request

KEY_ENV = "SCENEREF_TEST_OPENAI_KEY"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.5)
STORY = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"
INPUTS = {
    "storyboard": {"prompt": STORY, "scene_count": 3, "durations": [4, 4, 4]},
    "cinematographer": {"scene_prompt": "A desk lamp glows at dawn", "story_prompt": STORY, "iteration": 1, "markers": []},
    "prompt_engineer": {"scene_prompt": "A desk lamp glows at dawn", "story_prompt": STORY,
                        "enhanced_prompt": "Close-up of a desk lamp at dawn, 50mm, warm 3200K key light", "iteration": 1},
}
SCHEMAS = {"storyboard": StoryboardOutput, "cinematographer": CinematographerOutput, "prompt_engineer": PromptReview}


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()


def chat_for(server: FakeOpenAIServer, **overrides) -> OpenAIChat:
    options = {"base_url": server.base_url, "api_key_env": KEY_ENV, "model": "test-chat", "retry": FAST_RETRY, "timeout_s": 5.0}
    return OpenAIChat(LLMSettings(**{**options, **overrides}))


def messages(task: str) -> list[dict]:
    return [{"role": "system", "content": "Answer JSON."}, {"role": "user", "content": json.dumps(INPUTS[task])}]


# --- the converter -----------------------------------------------------------------------------


def written_by_the_model(value: BaseModel) -> dict:
    """`value` as the model writes it: every field, the ones our code sets (readOnly) left out."""
    reply = value.model_dump(mode="json")
    if isinstance(value, StoryboardOutput) and reply.get("consistency"):
        del reply["consistency"]["source"]
    return reply


def test_every_task_has_the_schema_its_agent_validates_with():
    assert TASK_SCHEMAS == SCHEMAS


@pytest.mark.parametrize("task", sorted(SCHEMAS))
def test_strict_schema_of_each_model_meets_strict_mode(task):
    model = SCHEMAS[task]
    assert strict_schema_problems(model.model_json_schema())  # pydantic's own would be refused
    assert strict_schema_problems(strict_schema(model)) == []


@pytest.mark.parametrize("task", sorted(SCHEMAS))
def test_strict_schema_accepts_what_the_agents_answer_and_the_model_accepts(task):
    """The offline agents' replies (what the double answers) fit the strict schema and the model;
    a reply with a key the model does not define, or one missing a field, does not fit."""
    schema = strict_schema(SCHEMAS[task])
    validator = jsonschema.Draft202012Validator(schema)
    reply = offline_reply(task, INPUTS[task])
    reply = written_by_the_model(SCHEMAS[task].model_validate(reply))
    assert list(validator.iter_errors(reply)) == []
    assert not validator.is_valid({**reply, "unexpected": 1})
    first = next(iter(reply))
    assert not validator.is_valid({k: v for k, v in reply.items() if k != first})


def test_nested_objects_are_closed_and_optional_fields_stay_nullable():
    schema = strict_schema(StoryboardOutput)
    sheet = schema["$defs"]["ConsistencySheet"]
    assert sheet["additionalProperties"] is False and set(sheet["required"]) == set(sheet["properties"])
    assert {"type": "null"} in schema["properties"]["consistency"]["anyOf"]  # optional: nullable, not omitted
    assert "source" not in sheet["properties"]  # set by the planner's code, never asked of the model
    validator = jsonschema.Draft202012Validator(schema)
    reply = written_by_the_model(StoryboardOutput.model_validate(offline_reply("storyboard", INPUTS["storyboard"])))
    reply["consistency"]["product"]["extra"] = "x"
    assert not validator.is_valid(reply)


def test_an_open_mapping_is_refused_by_the_converter():
    class Tags(BaseModel):
        counts: dict[str, int]

    with pytest.raises(ValueError, match="open mapping"):
        strict_schema(Tags)


# --- the client against the double ---------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(SCHEMAS))
async def test_each_request_carries_its_tasks_strict_schema(server, task):
    chat = chat_for(server)
    with collect() as ledger:
        reply = await chat.complete(messages(task), task=task)
    SCHEMAS[task].model_validate_json(reply)
    (sent,) = server.requests_for("chat")
    assert sent.fault is None
    assert sent.json["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": SCHEMAS[task].__name__, "strict": True, "schema": strict_schema(SCHEMAS[task])},
    }
    (usage,) = ledger
    assert usage.response_format == "json_schema" and usage.response_format_fallback is None


async def test_json_object_setting_and_gemini_default_send_json_mode(server):
    await chat_for(server, structured_output="json_object").complete(messages("storyboard"), task="storyboard")
    gemini = chat_for(server, provider="gemini", api_key_env=KEY_ENV)
    assert gemini.settings.structured_output == "json_object"
    await gemini.complete(messages("storyboard"), task="storyboard")
    assert [r.json["response_format"] for r in server.requests_for("chat")] == [{"type": "json_object"}] * 2
    assert chat_for(server, provider="gemini", structured_output="json_schema").settings.structured_output == "json_schema"


async def test_an_endpoint_refusing_json_schema_is_asked_in_json_mode_once_and_from_then_on(server, caplog):
    server.json_schema_support = False
    chat = chat_for(server)
    with caplog.at_level(logging.WARNING, logger="sceneref.providers"), collect() as ledger:
        first = await chat.complete(messages("cinematographer"), task="cinematographer")
        second = await chat.complete(messages("prompt_engineer"), task="prompt_engineer")
    CinematographerOutput.model_validate_json(first)
    PromptReview.model_validate_json(second)
    kinds = [r.json["response_format"]["type"] for r in server.requests_for("chat")]
    assert kinds == ["json_schema", "json_object", "json_object"]  # the schema is not tried again
    warnings = [r for r in caplog.records if "refused response_format json_schema" in r.getMessage()]
    assert len(warnings) == 1 and "not supported" in warnings[0].getMessage()
    assert [u.response_format for u in ledger] == ["json_object", "json_object"]
    assert all("json_schema refused (HTTP 400" in u.response_format_fallback for u in ledger)


async def test_a_400_about_something_else_is_no_reason_to_fall_back(server):
    server.add_faults("chat", Fault("400", message="Invalid 'messages[1].content': too long"))
    chat = chat_for(server)
    with pytest.raises(ProviderError, match="too long"):
        await chat.complete(messages("cinematographer"), task="cinematographer")
    assert len(server.requests_for("chat")) == 1 and chat.response_format == "json_schema"


async def test_validation_stays_the_safety_net_in_schema_mode(server):
    """A reply that is not the schema (an endpoint that ignores it) is re-asked, schema and all."""
    server.add_faults("chat", "malformed_schema")
    review = await ask_json(
        chat_for(server), task="prompt_engineer", system="Answer JSON.", inputs=INPUTS["prompt_engineer"],
        schema=PromptReview, retries=1,
    )
    assert 0 <= review.scores.completeness <= 100
    sent = server.requests_for("chat")
    assert len(sent) == 2 and all(r.json["response_format"]["type"] == "json_schema" for r in sent)


# --- the traces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("supported", [True, False], ids=["json_schema", "fallback"])
async def test_the_trace_summary_says_how_the_agents_replies_were_constrained(server, tmp_path, supported):
    server.json_schema_support = supported
    settings = make_settings(server, tmp_path, keep=True)
    gid = new_id()
    scenes = await run_generation(gid, request(advanced_image_num_variations=2), make_services(settings), settings)
    for scene in scenes:
        summary = json.loads((tmp_path / "traces" / gid / f"scene_{scene.scene_number}" / "prompt_trace_summary.json").read_text())
        calls = summary["cost"]["llm_calls"]
        if supported:
            assert summary["structured_output"] == {"calls": {"json_schema": calls}, "fallback": None}
        else:
            assert summary["structured_output"]["calls"] == {"json_object": calls}
            assert "json_schema refused (HTTP 400" in summary["structured_output"]["fallback"]
