"""Cost and time accounting: the price table, unknown models, the ledgers, and a
whole generation through the real `openai` client against the fake server, whose answers
carry token usage, with the telemetry hooks recorded by a MemorySink."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from pipeline.costs import (
    CallUsage, CostSummary, Meter, ModelPrice, PricingSettings, SceneTiming, combine, image_usage, price, summarize,
)
from pipeline.jobs.store import JobStore
from pipeline.providers.offline import OfflineChat
from pipeline.providers.retry import with_retries
from pipeline.providers.base import ProviderError
from pipeline.runner import run_generation
from pipeline.schemas import SceneResult, ScenePlan
from pipeline.settings import PipelineSettings, RetrySettings
from pipeline.jobs.status import to_status
from pipeline.telemetry import MemorySink, Telemetry, account, collect, hooks, set_sink
from testkit.doubles import FakeOpenAIServer
from tests.test_runner import KEY_ENV, make_services, make_settings, new_id, request

PRICES = PricingSettings(models={
    "chat-a": ModelPrice(input_per_1m=1.0, output_per_1m=4.0),
    "img-a": ModelPrice(per_image={"1024x576/high": 0.2, "1024x576": 0.1, "*": 0.05}),
    "img-tokens": ModelPrice(input_per_1m=10.0, output_per_1m=40.0, per_image={"*": 9.0}),
    "tiers": ModelPrice(per_image={"1K": 0.03, "4K": 0.12}),
})


def chat(model="chat-a", provider="openai", input_tokens=1000, output_tokens=500, stage="enhancement"):
    return CallUsage(kind="chat", provider=provider, model=model, input_tokens=input_tokens, output_tokens=output_tokens, stage=stage)


@pytest.fixture
def sink():
    recorded = MemorySink()
    previous = set_sink(recorded)
    yield recorded
    set_sink(previous)


# --- prices ------------------------------------------------------------------------------------


def test_chat_calls_are_priced_per_million_tokens():
    assert price(chat(), PRICES) == pytest.approx((1000 * 1.0 + 500 * 4.0) / 1e6)


def test_unknown_models_and_missing_tokens_cost_unknown_never_zero():
    assert price(chat(model="not-in-table"), PRICES) is None
    assert price(chat(input_tokens=None), PRICES) is None  # the endpoint did not say
    assert price(CallUsage(kind="image", provider="openai", model="not-in-table", images=1, size="1024x576"), PRICES) is None
    no_size_price = PricingSettings(models={"img": ModelPrice(per_image={"512x512": 0.01})})
    assert price(CallUsage(kind="image", provider="openai", model="img", images=1, size="1024x576"), no_size_price) is None


def test_offline_calls_cost_zero_whatever_their_model():
    assert price(chat(model="offline-agents", provider="offline"), PRICES) == 0.0


def test_image_prices_by_size_and_quality_then_size_then_any():
    def image(**fields):
        return CallUsage(kind="image", provider="openai", model="img-a", images=1, **fields)

    assert price(image(size="1024x576", quality="high"), PRICES) == 0.2
    assert price(image(size="1024x576", quality="low"), PRICES) == 0.1
    assert price(image(size="512x512"), PRICES) == 0.05


def test_token_billed_image_models_use_reported_tokens_first():
    usage = image_usage({"provider": "openai", "model": "img-tokens", "size": "1536x1024", "usage": {"input_tokens": 100, "output_tokens": 1000}})
    assert price(usage, PRICES) == pytest.approx((100 * 10 + 1000 * 40) / 1e6)
    without = image_usage({"provider": "openai", "model": "img-tokens", "size": "1536x1024"})
    assert price(without, PRICES) == 9.0


def test_gemini_metadata_is_priced_by_its_resolution_tier():
    # Gemini reports prompt_tokens/output_tokens and no pixel size; no token price here.
    meta = {"provider": "gemini", "model": "tiers", "image_size": "4K", "usage": {"prompt_tokens": 50, "output_tokens": 2000}}
    usage = image_usage(meta)
    assert (usage.input_tokens, usage.output_tokens, usage.size) == (50, 2000, "4K")
    assert price(usage, PRICES) == 0.12
    assert price(image_usage({"provider": "gemini", "model": "tiers", "image_size": None}), PRICES) == 0.03  # the 1K default


def test_default_table_prices_the_default_models():
    settings = PipelineSettings()
    luna = chat(model=settings.llm.model, input_tokens=1_000_000, output_tokens=1_000_000)
    assert price(luna, settings.pricing) == pytest.approx(0.60)
    assert settings.images.model in settings.pricing.models


def test_pricing_is_a_setting_and_refuses_unknown_fields():
    settings = PipelineSettings.model_validate({"pricing": {"models": {"m": {"input_per_1m": 2, "output_per_1m": 3}}}})
    assert settings.pricing.models["m"].output_per_1m == 3
    with pytest.raises(ValueError):
        PipelineSettings.model_validate({"pricing": {"models": {"m": {"per_token": 2}}}})


# --- summaries ---------------------------------------------------------------------------------


def test_one_unknown_call_makes_the_total_unknown_and_names_the_model():
    summary = summarize([chat(), chat(model="mystery", stage="planning")], PRICES)
    assert summary.usd is None and summary.unknown
    assert summary.priced_usd == pytest.approx(0.003)
    assert summary.unpriced_models == ["mystery"]
    assert summary.by_stage == {"enhancement": pytest.approx(0.003), "planning": None}
    assert (summary.llm_calls, summary.input_tokens, summary.output_tokens) == (2, 2000, 1000)


def test_combine_adds_scenes_and_keeps_unknown():
    known = summarize([chat()], PRICES)
    total = combine([known, known, None])
    assert total.usd == pytest.approx(0.006) and not total.unknown
    assert combine([known, summarize([chat(model="mystery")], PRICES)]).usd is None
    assert combine([]).usd == 0.0


# --- ledgers -----------------------------------------------------------------------------------


async def test_ledgers_nest_and_do_not_mix_between_concurrent_tasks():
    async def scene(n: int, calls: int) -> list:
        with collect() as ledger:
            for _ in range(calls):
                await asyncio.sleep(0)
                account(chat(input_tokens=n))
        return ledger

    with collect() as outer:
        one, two = await asyncio.gather(scene(1, 2), scene(2, 3))
    assert [c.input_tokens for c in one] == [1, 1]
    assert [c.input_tokens for c in two] == [2, 2, 2]
    assert len(outer) == 5
    account(chat())  # no ledger open: nothing to do, no error


async def test_meter_times_stages_prices_them_and_reports_once(sink):
    meter = Meter()
    with meter.stage("enhancement"):
        account(chat())
        await asyncio.sleep(0.01)
    meter.add([CallUsage(kind="image", provider="openai", model="img-a", images=1, size="1024x576")], stage="generation")
    cost, timing = meter.close(PRICES)
    assert cost.usd == pytest.approx(0.103) and cost.images == 1
    assert timing.enhancement_s > 0 and timing.generation_s is None
    assert [args[0] for args in sink.named("stage_seconds")] == ["enhancement"]
    assert sink.named("cost") == [("enhancement", pytest.approx(0.003))]
    assert sink.named("usage") == [("chat", "chat-a", 1000, 500)]


def test_a_failing_sink_never_breaks_the_caller(caplog):
    """The failing hook is reached and raises; the caller goes on, the failure is logged with
    its cause, and the next hook still reaches the sink."""
    reached = []

    class Broken(Telemetry):
        def stage_seconds(self, stage, seconds):
            reached.append(("stage_seconds", stage, seconds))
            raise RuntimeError("exporter down")

        def cost(self, stage, usd):
            reached.append(("cost", stage, usd))

    previous = set_sink(Broken())
    try:
        with caplog.at_level(logging.WARNING, logger="sceneref.telemetry"):
            hooks().stage_seconds("scoring", 1.0)
            hooks().cost("scoring", 0.5)
    finally:
        set_sink(previous)
    assert reached == [("stage_seconds", "scoring", 1.0), ("cost", "scoring", 0.5)]
    (logged,) = [r for r in caplog.records if "stage_seconds" in r.getMessage()]
    assert isinstance(logged.exc_info[1], RuntimeError) and str(logged.exc_info[1]) == "exporter down"


# --- the retry loop's hooks ----------------------------------------------------------------------

FAST = RetrySettings(max_attempts=3, initial_delay_s=0.0, max_delay_s=0.0)


async def test_retry_loop_reports_retries_and_outcomes_by_kind(sink):
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ProviderError("overloaded", retryable=True, status_code=503)
        return "ok"

    assert await with_retries(flaky, FAST, what="chat storyboard (m)") == "ok"

    async def refused():
        raise ProviderError("bad request", retryable=False, status_code=400)

    with pytest.raises(ProviderError):
        await with_retries(refused, FAST, what="image generate (m, variation 1)")
    assert sink.named("provider_retry") == [("chat", "server_error"), ("chat", "server_error")]
    assert sink.named("provider_call") == [("chat", "ok"), ("image", "error", "client_error")]


# --- a whole generation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


async def test_generation_costs_and_times_every_scene_and_the_total(server, tmp_path, monkeypatch, sink):
    """gpt-6-luna's list price on the fake server's reported tokens; images priced per image
    from the settings' table; the status adds planning and every scene."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    settings = make_settings(server, tmp_path, keep=True)
    settings.llm.model = "gpt-6-luna"
    settings.pricing.models["gpt-image-1"] = ModelPrice(per_image={f"{settings.images.size}/medium": 0.02})
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    gid = new_id()
    store.create(gid, "alice", request(advanced_image_num_variations=2).model_dump(mode="json"), offline=False)

    async def plan(storyboard):
        store.update(gid, storyboard=storyboard)

    scenes = await run_generation(
        gid, request(advanced_image_num_variations=2), make_services(settings), settings,
        on_plan=plan, on_scene=lambda s: store.checkpoint_scene(gid, s),
    )
    chats = server.requests_for("chat")
    sent_words = sum(len(str(m.get("content", "")).split()) for r in chats for m in r.json["messages"])
    for scene in scenes:
        assert scene.cost.images == 2 and scene.cost.llm_calls >= 2
        expected = (scene.cost.input_tokens * 0.10 + scene.cost.output_tokens * 0.50) / 1e6 + 2 * 0.02
        assert scene.cost.usd == pytest.approx(expected, abs=1e-6)
        assert set(scene.timing.model_dump()) == {"enhancement_s", "generation_s", "scoring_s", "total_s"}
        assert scene.timing.generation_s > 0 and scene.timing.scoring_s > 0

    status = to_status(store.get(gid), store.scenes(gid), lambda key: key).model_dump(mode="json")
    total = status["cost"]
    assert total["llm_calls"] == len(chats)  # every chat call, the storyboard's included
    assert total["input_tokens"] == sent_words  # the fake server counts words of what was sent
    assert total["images"] == 2 * len(scenes)
    assert total["usd"] == pytest.approx(sum(s.cost.usd for s in scenes) + status_planning(store, gid), abs=1e-6)
    assert set(total["by_stage"]) == {"planning", "enhancement", "generation"}
    assert status["timing"]["planning_s"] is not None and status["timing"]["scenes_timed"] == len(scenes)
    entry = status["storyboard_plan"]["scenes"][0]
    assert entry["cost"] == scenes[0].cost.model_dump(mode="json") and entry["timing"]["total_s"] > 0
    assert "cost" not in status["storyboard_plan"] and "planning" not in entry  # totals only at the top level

    traces = tmp_path / "traces" / gid / "scene_2"
    quality = json.loads((traces / "quality_scores.json").read_text())
    assert quality["cost"]["usd"] == pytest.approx(scenes[1].cost.usd) and quality["timing"]["scoring_s"] > 0
    summary = json.loads((traces / "prompt_trace_summary.json").read_text())
    assert summary["cost"]["llm_calls"] == scenes[1].cost.llm_calls and summary["timing"]["enhancement_s"] > 0

    stages = {args[0] for args in sink.named("stage_seconds")}
    assert stages == {"planning", "enhancement", "generation", "scoring"}
    assert len(sink.named("enhancement_iterations")) == len(scenes)
    assert sum(args[1] for args in sink.named("images_generated")) == 2 * len(scenes)
    assert [args[0] for args in sink.named("selected_quality")] == [s.quality_score for s in scenes]
    assert ("chat", "ok") in sink.named("provider_call")
    store.close()


def status_planning(store: JobStore, gid: str) -> float:
    plans = store.get(gid).storyboard
    assert plans[0].planning is not None and all(p.planning is None for p in plans[1:])
    return plans[0].planning.cost.usd


async def test_an_unpriced_model_makes_the_generation_cost_unknown(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    settings = make_settings(server, tmp_path)  # test-chat and gpt-image-1 are in no price table
    scenes = await run_generation(new_id(), request(advanced_image_num_variations=2), make_services(settings), settings)
    for scene in scenes:
        assert scene.cost.usd is None and scene.cost.unknown
        assert set(scene.cost.unpriced_models) == {"test-chat", "gpt-image-1"}
        assert scene.cost.input_tokens > 0  # tokens are still counted


async def test_offline_chat_reports_plausible_tokens_at_zero_cost():
    with collect() as ledger:
        await OfflineChat().complete([{"role": "user", "content": json.dumps({"prompt": "A lamp for late nights", "scene_count": 3})}], task="storyboard")
    (usage,) = ledger
    assert usage.provider == "offline" and usage.input_tokens > 3 and usage.output_tokens > 20
    assert summarize(ledger, PipelineSettings().pricing).usd == 0.0


def test_status_of_scenes_stored_before_accounting_has_no_scene_cost_keys(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create("g", "alice", request().model_dump(mode="json"), offline=False)
    store.update("g", storyboard=[ScenePlan(scene_number=1, duration=4, prompt="a lamp")])
    store.checkpoint_scene("g", SceneResult(scene_number=1, duration=4, original_prompt="a lamp", enhanced_prompt="a lamp", reference_image_key="k"))
    status = to_status(store.get("g"), store.scenes("g"), lambda key: key).model_dump(mode="json")
    assert "cost" not in status["storyboard_plan"]["scenes"][0]
    assert status["cost"] == CostSummary().model_dump(mode="json")
    assert status["timing"]["planning_s"] is None and status["timing"]["elapsed_s"] >= 0
    assert SceneTiming().total_s == 0.0
    store.close()


# --- across the Serve boundary (no Ray: fake handles) ------------------------------------------


async def test_handle_chat_adds_the_replicas_usage_to_the_callers_ledger_even_on_error(sink):
    from deployments.adapters import HandleChat, HandleRetry
    from tests.test_adapters import Handle, Method, scripted

    usage = chat(model="gpt-6-luna").model_dump()
    answers = scripted(
        {"text": "{}", "usage": [usage]},
        {"error": "bad output", "retryable": False, "status_code": 400, "usage": [usage, usage]},
    )
    client = HandleChat(Handle(complete=Method(answers)), HandleRetry(calls=FAST))
    with collect() as ledger:
        assert await client.complete([], task="storyboard") == "{}"
        with pytest.raises(ProviderError):
            await client.complete([], task="cinematographer")
    assert [c.model for c in ledger] == ["gpt-6-luna"] * 3
    # the ingress's handle calls are their own kind, so a provider call is not counted twice
    assert sink.named("provider_call") == [("handle", "ok"), ("handle", "ok")]


async def test_final_status_is_counted_from_the_store_only_when_the_job_ended(sink, tmp_path):
    from deployments.metrics import record_final_status

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    for gid in ("done", "released"):
        store.create(gid, "alice", request().model_dump(mode="json"), offline=True)
    lease = store.claim("runner", 30, generation_id="done")
    store.finish(lease, "failed", error="scene 2: scoring failed")
    await record_final_status(store, "done")
    await record_final_status(store, "released")  # queued again for another runner: not counted here
    await record_final_status(store, "missing")
    assert sink.named("generation_finished") == [("failed",)]
    store.close()
