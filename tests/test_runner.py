"""End-to-end tests of the generation runner and job execution.

Chat and images go through the real `openai` client (OpenAIChat / OpenAIImages) against the
local FakeOpenAIServer, scoring through the deterministic PixelScoring double, artifacts and
traces in tmp_path. Counts and chaining are checked from the server's recorded requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import uuid

import pytest
from PIL import Image

from pipeline.agents import CINEMATOGRAPHER, PROMPT_ENGINEER
from pipeline.storage.objectstore import LocalObjectStore
from pipeline.jobs.store import JobStore
from pipeline.providers.openai_clients import OpenAIChat, OpenAIImages
from pipeline.runner import GenerationError, ProgressEvent, Services, run_generation
from pipeline.schemas import GenerationRequest, ScorerResult, SceneResult, VariationResult
from pipeline.ranking import rank
from pipeline.jobs.run import execute_job
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings, RetrySettings, TraceSettings
from pipeline.jobs.status import to_status
from pipeline.storyboard import SYSTEM as STORYBOARD_SYSTEM
from testkit.doubles import FakeOpenAIServer, Fault, PixelScoring, RecordedRequest

KEY_ENV = "SCENEREF_TEST_OPENAI_KEY"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.5)
WEIGHTS = {"pickscore": 0.50, "clipscore": 0.25, "vqascore": 0.15, "aesthetic": 0.10}
STORY = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"
SIZE = (64, 36)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    server.chat_latency_s = server.image_latency_s = 0.0
    yield
    server.reset()


def make_settings(server, tmp_path, *, keep: bool = False, image_retry: RetrySettings = FAST_RETRY) -> PipelineSettings:
    return PipelineSettings(
        llm=LLMSettings(base_url=server.base_url, api_key_env=KEY_ENV, model="test-chat", retry=FAST_RETRY, timeout_s=5.0),
        images=ImageSettings(
            base_url=server.base_url,
            api_key_env=KEY_ENV,
            model="gpt-image-1",
            size=f"{SIZE[0]}x{SIZE[1]}",
            retry=image_retry,
            timeout_s=5.0,
        ),
        traces=TraceSettings(root=tmp_path / "traces", keep=keep),
        artifacts_dir=tmp_path / "artifacts",
    )


def make_services(settings: PipelineSettings, scoring: PixelScoring | None = None) -> Services:
    return Services(
        chat=OpenAIChat(settings.llm),
        images=OpenAIImages(settings.images),
        scoring=scoring or PixelScoring(),
        artifacts=LocalObjectStore(settings.artifacts_dir),
    )


def request(**overrides) -> GenerationRequest:
    return GenerationRequest(prompt=STORY, target_duration=15, **overrides)


def claim(store: JobStore, gid: str):
    """The job's lease, as a runner holds it while it executes the job."""
    lease = store.claim("test-runner", 30, generation_id=gid)
    assert lease is not None
    return lease


def resumed(store: JobStore, gid: str):
    """A failed job put back in the queue by its owner, then claimed: how a user resumes it."""
    assert store.requeue(gid, "alice")
    return claim(store, gid)


def new_id() -> str:
    return f"gen-{uuid.uuid4().hex[:12]}"


def png(colour: tuple[int, int, int], size: tuple[int, int] = SIZE) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], 40, 200), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(out, format="PNG")
    return out.getvalue()


# --- reading the server's record -------------------------------------------------------------


def chat_task(record: RecordedRequest) -> str:
    system = record.json["messages"][0]["content"]
    return {STORYBOARD_SYSTEM: "storyboard", CINEMATOGRAPHER: "cinematographer", PROMPT_ENGINEER: "prompt_engineer"}[system]


def chat_payload(record: RecordedRequest) -> dict:
    return json.loads(record.json["messages"][1]["content"])


def enhancement_calls_by_scene(server, scenes: list[SceneResult]) -> dict[int, int]:
    by_prompt = {scene.original_prompt: scene.scene_number for scene in scenes}
    counts = dict.fromkeys(by_prompt.values(), 0)
    for record in server.requests_for("chat"):
        if chat_task(record) != "storyboard":
            counts[by_prompt[chat_payload(record)["scene_prompt"]]] += 1
    return counts


def image_prompt(record: RecordedRequest) -> str:
    return record.json["prompt"] if record.endpoint == "generations" else record.form["prompt"]


def image_requests_by_scene(server, scenes: list[SceneResult]) -> dict[int, list[RecordedRequest]]:
    by_prompt = {scene.enhanced_prompt: scene.scene_number for scene in scenes if not scene.user_provided}
    assert len(by_prompt) == sum(not s.user_provided for s in scenes), "enhanced prompts must be distinct"
    grouped: dict[int, list[RecordedRequest]] = {scene.scene_number: [] for scene in scenes}
    for record in server.requests_for("generations") + server.requests_for("edits"):
        grouped[by_prompt[image_prompt(record)]].append(record)
    return grouped


def expected_overall(scores: dict[str, ScorerResult]) -> float:
    return sum(WEIGHTS[name] * scores[name].score for name in WEIGHTS)


def read_json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- units: ranking and the scoring double ----------------------------------------------------


def test_rank_orders_by_overall_and_breaks_ties_by_lower_variation():
    variations = [
        VariationResult(variation=1, overall=60.0),
        VariationResult(variation=2, overall=71.5),
        VariationResult(variation=3, error="HTTP 400"),
        VariationResult(variation=4, overall=71.5),
        VariationResult(variation=5, overall=12.0),
    ]
    ordered = rank(list(reversed(variations)))
    assert [v.variation for v in ordered] == [2, 4, 1, 5]
    assert [v.rank for v in ordered] == [1, 2, 3, 4]
    assert variations[2].rank is None  # a failed variation is not ranked


async def test_pixel_scoring_is_deterministic_and_records_calls():
    images = [png((20 * i, 90, 255 - 30 * i)) for i in range(5)]
    scoring = PixelScoring()
    first = await scoring.score(images, ["p"] * 5)
    again = await scoring.score(images[:2], ["p"] * 2)
    assert first[:2] == again and scoring.batch_sizes == [5, 2]
    for result in first:
        assert set(result) == set(WEIGHTS)
        assert all(0 <= s.score < 100 and s.truncated is False for s in result.values())
    overalls = [expected_overall(r) for r in first]
    assert len(set(overalls)) == len(overalls)

    slow = PixelScoring(latency_s=0.2)
    started = time.perf_counter()
    await asyncio.gather(slow.score(images[:1], ["p"]), slow.score(images[1:3], ["p", "p"]))
    assert time.perf_counter() - started >= 0.2 and slow.max_in_flight == 2  # waited its latency, both calls at once

    broken = PixelScoring(fail=True)
    with pytest.raises(RuntimeError, match="unavailable"):
        await broken.score(images, ["p"] * 5)
    assert broken.batch_sizes == [5] and broken.calls[0].failed


# --- the full text-to-image path --------------------------------------------------------------


async def test_text_generation_end_to_end_counts_chaining_selection_and_traces(server, tmp_path):
    settings = make_settings(server, tmp_path, keep=True)
    scoring = PixelScoring()
    services = make_services(settings, scoring)
    events: list[ProgressEvent] = []
    selected_at: list[tuple[int, float]] = []
    gid = new_id()

    scenes = await run_generation(
        gid,
        request(),
        services,
        settings,
        on_event=events.append,
        on_scene=lambda scene: selected_at.append((scene.scene_number, time.monotonic())),
    )

    # 15 s -> 4 scenes, durations summing to the target
    assert [s.scene_number for s in scenes] == [1, 2, 3, 4]
    assert sum(s.duration for s in scenes) == 15

    # Chat: one storyboard call, then 2 calls (agent 1 + agent 2) per enhancement iteration.
    tasks = [chat_task(r) for r in server.requests_for("chat")]
    assert tasks.count("storyboard") == 1 and tasks[0] == "storyboard"
    scene_dir = {n: settings.traces.root / gid / f"scene_{n}" for n in range(1, 5)}
    iterations = {n: read_json(scene_dir[n] / "prompt_trace_summary.json")["total_iterations"] for n in scene_dir}
    assert enhancement_calls_by_scene(server, scenes) == {n: 2 * iterations[n] for n in iterations}

    # Images: 4 variations per scene; scene 1 generates, 2..4 edit with the previous best image.
    by_scene = image_requests_by_scene(server, scenes)
    assert len(server.requests_for("generations")) == 4 and len(server.requests_for("edits")) == 12
    for scene in scenes:
        requests = by_scene[scene.scene_number]
        assert len(requests) == 4
        expected_endpoint = "generations" if scene.scene_number == 1 else "edits"
        assert {r.endpoint for r in requests} == {expected_endpoint}
        if scene.scene_number > 1:
            previous = services.artifacts.get(scenes[scene.scene_number - 2].reference_image_key)
            assert all(r.image == previous for r in requests)
        assert {r.request_id for r in requests} == {v.provider_metadata["request_id"] for v in scene.variations}

    # Scoring: one batch per scene with every variation; selection is the best weighted overall.
    assert scoring.batch_sizes == [4, 4, 4, 4]
    for scene in scenes:
        assert not scene.user_provided and not scene.below_threshold
        assert len(scene.variations) == 4 and all(v.error is None for v in scene.variations)
        overall = {v.variation: expected_overall(v.scores) for v in scene.variations}
        for v in scene.variations:
            assert v.overall == pytest.approx(overall[v.variation], abs=1e-3)
            # the recorded scores are the scorer's own for the stored image
            assert v.scores == scoring.score_one(services.artifacts.get(v.image_key))
        best = max(overall, key=lambda k: (overall[k], -k))
        assert scene.selected_variation == best
        assert scene.quality_score == pytest.approx(overall[best], abs=1e-3)
        # the run's own key for it: {gid}/scene_{n}/attempt_{attempt}/variation_{k}.png (fencing)
        assert re.fullmatch(rf"{gid}/scene_{scene.scene_number}/attempt_[0-9a-f]+/variation_{best}\.png",
                            scene.reference_image_key)
        assert scene.enhanced_prompt != scene.original_prompt and scene.prompt_score is not None

    # Progress: monotonic, ends at 100; on_scene once per scene, in order, before the next
    # scene's first image request.
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 100 and events[-1].stage == "completed"
    assert [n for n, _ in selected_at] == [1, 2, 3, 4]
    for (n, at) in selected_at[:-1]:
        assert at <= min(r.started for r in by_scene[n + 1])

    # Trace tree: exact names, per scene.
    for scene in scenes:
        n = scene.scene_number
        k = iterations[n]
        agent_files = []
        for i in range(1, k + 1):
            agent_files += [f"{2 * i - 1:02d}_agent1_iteration_{i}.txt", f"{2 * i:02d}_agent2_iteration_{i}.txt"]
        expected = {
            "00_original_prompt.txt",
            *agent_files,
            "final_enhanced_prompt.txt",
            "prompt_trace_summary.json",
            *(f"image_{v}.png" for v in range(1, 5)),
            "quality_scores.json",
            "selected_best.txt",
        }
        assert {p.name for p in scene_dir[n].iterdir()} == expected
        d = scene_dir[n]
        assert (d / "00_original_prompt.txt").read_text().strip() == scene.original_prompt
        assert (d / "final_enhanced_prompt.txt").read_text().strip() == scene.enhanced_prompt
        for v in scene.variations:
            assert (d / f"image_{v.variation}.png").read_bytes() == services.artifacts.get(v.image_key)

        summary = read_json(d / "prompt_trace_summary.json")
        assert {"original_prompt", "final_prompt", "initial_scores", "final_scores", "total_iterations", "iterations"} <= set(summary)
        assert summary["original_prompt"] == scene.original_prompt
        assert summary["final_prompt"] == scene.enhanced_prompt
        assert summary["final_scores"]["overall"] == scene.prompt_score
        assert summary["total_iterations"] == len(summary["iterations"]) == k
        assert summary["initial_scores"] == summary["iterations"][0]["scores"]
        dims = {"completeness", "specificity", "professionalism", "cinematography", "brand_alignment", "overall"}
        for i, item in enumerate(summary["iterations"], start=1):
            assert item["iteration"] == i
            assert set(item["scores"]) == dims
            assert item["enhanced_prompt"] and item["critique"] and isinstance(item["improvements"], list)
            assert item["timestamp"]
            assert (d / f"{2 * i - 1:02d}_agent1_iteration_{i}.txt").read_text().strip().endswith(item["enhanced_prompt"])
            agent2 = (d / f"{2 * i:02d}_agent2_iteration_{i}.txt").read_text()
            assert item["critique"] in agent2 and "overall (weighted)" in agent2
            assert all(improvement in agent2 for improvement in item["improvements"])
        assert summary["final_prompt"] in [item["enhanced_prompt"] for item in summary["iterations"]]

        quality = read_json(d / "quality_scores.json")
        assert quality["prompt"] == scene.enhanced_prompt
        assert quality["weights"] == WEIGHTS
        assert len(quality["variations"]) == 4
        for entry, v in zip(quality["variations"], scene.variations):
            assert entry["variation"] == v.variation and entry["image"] == f"image_{v.variation}.png"
            assert entry["overall"] == v.overall and entry["rank"] == v.rank and entry["error"] is None
            assert entry["scores"] == {name: s.model_dump() for name, s in v.scores.items()}
            assert entry["provider_metadata"]["request_id"] == v.provider_metadata["request_id"]
        best_entry = min(quality["variations"], key=lambda e: e["rank"])
        assert best_entry["variation"] == scene.selected_variation

        selected = (d / "selected_best.txt").read_text()
        assert selected.splitlines()[0] == f"selected: image_{scene.selected_variation}.png"
        assert f"{scene.quality_score:.2f}" in selected

    # keep=True: the traces outlive the generation
    assert (settings.traces.root / gid).is_dir()


async def test_traces_are_removed_after_completion_by_default(server, tmp_path):
    settings = make_settings(server, tmp_path, keep=False)
    seen_during_run: list[bool] = []
    gid = new_id()

    def on_scene(scene: SceneResult) -> None:  # a scene's trace files follow its checkpoint
        earlier = settings.traces.root / gid / f"scene_{scene.scene_number - 1}" / "selected_best.txt"
        seen_during_run.append(earlier.is_file())

    scenes = await run_generation(gid, request(), make_services(settings), settings, on_scene=on_scene)
    assert seen_during_run == [False, True, True, True]  # written while running ...
    assert not (settings.traces.root / gid).exists()  # ... and removed at completion
    store = LocalObjectStore(settings.artifacts_dir)
    assert all(store.exists(s.reference_image_key) for s in scenes)  # images are artifacts, kept


async def test_user_image_is_scene_one_unchanged_and_chains_into_scene_two(server, tmp_path):
    settings = make_settings(server, tmp_path, keep=True)
    services = make_services(settings)
    user_image = png((200, 120, 30))
    gid = new_id()

    scenes = await run_generation(gid, request(), services, settings, reference_image=user_image)

    first = scenes[0]
    assert first.user_provided and first.selected_variation is None and first.variations == []
    assert first.quality_score is None and first.enhanced_prompt == first.original_prompt
    assert services.artifacts.get(first.reference_image_key) == user_image

    assert server.requests_for("generations") == []  # nothing generated for scene 1
    calls = enhancement_calls_by_scene(server, scenes)
    assert calls[1] == 0 and all(calls[n] >= 2 for n in (2, 3, 4))
    by_scene = image_requests_by_scene(server, scenes)
    assert by_scene[1] == [] and len(server.requests_for("edits")) == 12
    assert len(by_scene[2]) == 4 and all(r.image == user_image for r in by_scene[2])
    assert all(r.image == services.artifacts.get(scenes[1].reference_image_key) for r in by_scene[3])

    d = settings.traces.root / gid / "scene_1"
    # Nothing enhanced, generated or scored; the summary holds only the consistency sheet,
    # written with the user's image in front of the model (the real client's content parts).
    assert {p.name for p in d.iterdir()} == {"00_original_prompt.txt", "prompt_trace_summary.json", "selected_best.txt"}
    assert "user-provided" in (d / "selected_best.txt").read_text()
    summary = json.loads((d / "prompt_trace_summary.json").read_text())
    assert summary["user_provided"] is True and summary["iterations"] == []
    assert summary["consistency_sheet"]["source"] == "image"
    [planner] = [r for r in server.requests_for("chat") if chat_task(r) == "storyboard"]
    parts = planner.json["messages"][1]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


async def test_equal_scores_select_the_lowest_variation(server, tmp_path):
    settings = make_settings(server, tmp_path)
    tie = PixelScoring(fixed={"pickscore": 70, "clipscore": 60, "vqascore": 50, "aesthetic": 40})
    scenes = await run_generation(new_id(), request(), make_services(settings, tie), settings)
    for scene in scenes:
        assert scene.selected_variation == 1
        assert scene.quality_score == pytest.approx(0.5 * 70 + 0.25 * 60 + 0.15 * 50 + 0.10 * 40)
        assert sorted(v.rank for v in scene.variations) == [1, 2, 3, 4]


# --- faults -----------------------------------------------------------------------------------


async def test_rate_limit_and_server_error_on_images_are_retried(server, tmp_path, caplog):
    settings = make_settings(server, tmp_path)
    server.add_faults("generations", Fault("429", retry_after=0.2), "500")
    server.add_faults("edits", "500")
    with caplog.at_level(logging.WARNING, logger="sceneref.providers"):
        scenes = await run_generation(new_id(), request(), make_services(settings), settings)

    assert all(v.error is None for s in scenes for v in s.variations)
    assert len(server.requests_for("generations")) == 6 and len(server.requests_for("edits")) == 13
    assert sum(v.provider_metadata["attempts"] for v in scenes[0].variations) == 6
    assert [r.fault for r in server.requests_for("generations")][:2] == ["429", "500"]
    assert any("(Retry-After)" in r.message and "0.20s" in r.message for r in caplog.records)
    # The 429'd variation waited the server's 0.2 s, not the 0.01 s backoff.
    retried = [r for r in server.requests_for("generations")[4:]]
    assert max(r.started for r in retried) - server.requests_for("generations")[0].started >= 0.2


async def test_a_failing_variation_is_recorded_and_the_scene_goes_on(server, tmp_path):
    two_attempts = RetrySettings(max_attempts=2, initial_delay_s=0.01, max_delay_s=0.1)
    settings = make_settings(server, tmp_path, keep=True, image_retry=two_attempts)
    # Scene 1: one variation gets a non-retryable 400.
    server.add_faults("generations", Fault("400", message="Your prompt was rejected (fake)"))
    # Scene 2: every first attempt fails with a 500, then the first retry too: that
    # variation exhausts its two attempts, the other three succeed on their retry.
    server.add_faults("edits", *["500"] * 5)
    gid = new_id()
    scenes = await run_generation(gid, request(), make_services(settings), settings)

    assert len(scenes) == 4
    failed = {s.scene_number: [v for v in s.variations if v.error] for s in scenes}
    assert [len(failed[n]) for n in (1, 2, 3, 4)] == [1, 1, 0, 0]
    assert "Your prompt was rejected" in failed[1][0].error and "not retryable" in failed[1][0].error
    assert "after 2 attempts" in failed[2][0].error and "HTTP 500" in failed[2][0].error
    for n in (1, 2):
        scene = scenes[n - 1]
        bad = failed[n][0]
        assert bad.image_key is None and bad.overall is None and bad.rank is None and bad.scores == {}
        ok = [v for v in scene.variations if not v.error]
        assert len(ok) == 3 and scene.selected_variation in {v.variation for v in ok}
        assert sorted(v.rank for v in ok) == [1, 2, 3]
        d = settings.traces.root / gid / f"scene_{n}"
        assert not (d / f"image_{bad.variation}.png").exists()
        entry = read_json(d / "quality_scores.json")["variations"][bad.variation - 1]
        assert entry["error"] == bad.error and entry["image"] is None and entry["overall"] is None
        assert f"image_{bad.variation}: failed" in (d / "selected_best.txt").read_text()
    assert len(server.requests_for("generations")) == 4
    assert len(server.requests_for("edits")) == 12 + 4


async def run_until_scene_three_fails(server, tmp_path, store: JobStore, settings, gid: str):
    """First run: scenes 1-2 finish, then every scene 3 image request gets a 400."""
    store.create(gid, "alice", request().model_dump(), offline=False)

    def inject(event: ProgressEvent) -> None:
        if event.stage == "scene_completed" and event.scene == 2:
            server.add_faults("edits", *[Fault("400", message="content policy (fake)")] * 4)

    return await execute_job(store, claim(store, gid), make_services(settings), settings, on_event=inject)


async def test_all_variations_failing_fails_the_job_and_keeps_finished_scenes(server, tmp_path):
    settings = make_settings(server, tmp_path)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_id()
    assert await run_until_scene_three_fails(server, tmp_path, store, settings, gid) is None

    record = store.get(gid)
    assert record.status == "failed" and record.stage == "failed"
    assert record.error.startswith("scene 3: no image could be generated")
    assert all(f"variation {k}: " in record.error for k in range(1, 5)) and "content policy" in record.error
    assert [s.scene_number for s in store.scenes(gid)] == [1, 2]
    assert len(record.storyboard) == 4
    # Traces are kept when a generation fails, so the failure can be explained.
    assert (settings.traces.root / gid / "scene_2" / "selected_best.txt").is_file()
    store.close()


async def test_run_generation_raises_generation_error_naming_the_scene(server, tmp_path):
    settings = make_settings(server, tmp_path)
    server.add_faults("generations", *[Fault("400", message="content policy (fake)")] * 4)
    with pytest.raises(GenerationError, match=r"^scene 1: no image could be generated \(variation 1: .*content policy"):
        await run_generation(new_id(), request(), make_services(settings), settings)


async def test_resume_generates_only_the_missing_scenes(server, tmp_path):
    settings = make_settings(server, tmp_path)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_id()
    assert await run_until_scene_three_fails(server, tmp_path, store, settings, gid) is None
    before = store.scenes(gid)
    assert [s.scene_number for s in before] == [1, 2]

    server.reset()  # faults cleared, a fresh record of requests
    events: list[ProgressEvent] = []
    services = make_services(settings)
    scenes = await execute_job(store, resumed(store, gid), services, settings, on_event=events.append)

    assert scenes is not None and [s.scene_number for s in scenes] == [1, 2, 3, 4]
    assert scenes[:2] == before  # the checkpointed scenes, not regenerated
    tasks = [chat_task(r) for r in server.requests_for("chat")]
    assert "storyboard" not in tasks
    calls = enhancement_calls_by_scene(server, scenes)
    assert calls[1] == calls[2] == 0 and calls[3] >= 2 and calls[4] >= 2
    assert server.requests_for("generations") == []
    by_scene = image_requests_by_scene(server, scenes)
    assert len(by_scene[3]) == len(by_scene[4]) == 4 and not by_scene[1] and not by_scene[2]
    assert all(r.image == services.artifacts.get(before[1].reference_image_key) for r in by_scene[3])
    assert all(r.image == services.artifacts.get(scenes[2].reference_image_key) for r in by_scene[4])

    record = store.get(gid)
    assert record.status == "completed" and record.progress == 100
    assert [s.scene_number for s in store.scenes(gid)] == [1, 2, 3, 4]
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 100

    status = to_status(record, store.scenes(gid), lambda key: f"https://example.test/artifacts/{key}")
    body = json.loads(status.model_dump_json())
    assert body["generation_id"] == gid and body["status"] == "completed" and body["progress"] == 100
    assert body["advanced_image_generation_used"] is True
    assert body["storyboard_plan"]["advanced_image_settings"] == {
        "quality_threshold": 30.0,
        "num_variations": 4,
        "max_enhancement_iterations": 4,
    }
    listed = body["storyboard_plan"]["scenes"]
    assert [s["scene_number"] for s in listed] == [1, 2, 3, 4]
    for entry, scene in zip(listed, scenes):
        assert entry["reference_image_url"] == f"https://example.test/artifacts/{scene.reference_image_key}"
        assert entry["quality_score"] == scene.quality_score and entry["quality_score"] is not None
        assert entry["status"] == "completed"
    store.close()


async def test_a_resumed_job_that_completes_has_no_stale_error(server, tmp_path):
    settings = make_settings(server, tmp_path)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_id()
    await run_until_scene_three_fails(server, tmp_path, store, settings, gid)
    server.reset()
    await execute_job(store, resumed(store, gid), make_services(settings), settings)
    record = store.get(gid)
    store.close()
    assert record.status == "completed"
    assert record.error is None


async def test_resumed_progress_does_not_go_backwards(server, tmp_path):
    settings = make_settings(server, tmp_path)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_id()
    await run_until_scene_three_fails(server, tmp_path, store, settings, gid)
    reached = store.get(gid).progress
    assert reached >= 62  # two of four scenes were selected
    server.reset()
    events: list[ProgressEvent] = []
    await execute_job(store, resumed(store, gid), make_services(settings), settings, on_event=events.append)
    store.close()
    assert min(e.progress for e in events) >= reached


async def test_resumed_progress_without_a_finished_scene_does_not_go_backwards(server, tmp_path):
    """Scene 1 fails, so no scene is checkpointed: the resumed run used to start again at the
    planning step's 5 although the job row showed the enhancement's 25."""
    settings = make_settings(server, tmp_path)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_id()
    store.create(gid, "alice", request().model_dump(), offline=False)
    server.add_faults("generations", *[Fault("400", message="content policy (fake)")] * 4)
    assert await execute_job(store, claim(store, gid), make_services(settings), settings) is None
    assert store.get(gid).status == "failed" and store.scenes(gid) == []

    server.reset()
    lease = resumed(store, gid)
    store.update(gid, progress=25, lease=lease)  # what the first run's last progress write left
    written: list[int] = []
    append = store.append_events

    def recording_append(*args, **kwargs):  # progress is written with the job's events
        if kwargs.get("progress") is not None:
            written.append(kwargs["progress"])
        return append(*args, **kwargs)

    store.append_events = recording_append
    events: list[ProgressEvent] = []
    scenes = await execute_job(store, lease, make_services(settings), settings, on_event=events.append)
    record = store.get(gid)
    store.close()
    assert scenes is not None and record.status == "completed" and record.progress == 100
    assert min(e.progress for e in events) >= 25
    assert written and min(written) >= 25


async def test_run_generation_starts_at_the_progress_it_is_given(server, tmp_path):
    settings = make_settings(server, tmp_path)
    events: list[ProgressEvent] = []
    await run_generation(new_id(), request(), make_services(settings), settings, start_progress=40, on_event=events.append)
    progress = [e.progress for e in events]
    assert progress[0] == 40 and progress == sorted(progress) and progress[-1] == 100


async def test_malformed_llm_json_is_retried(server, tmp_path, caplog):
    settings = make_settings(server, tmp_path)
    # The storyboard call is the first chat request and is alone: both faults hit it.
    server.add_faults("chat", "malformed", "malformed_schema")
    with caplog.at_level(logging.WARNING, logger="sceneref.agents"):
        scenes = await run_generation(new_id(), request(), make_services(settings), settings)
    assert len(scenes) == 4
    chats = server.requests_for("chat")
    assert [chat_task(r) for r in chats[:3]] == ["storyboard"] * 3
    assert [r.fault for r in chats[:3]] == ["malformed", "malformed_schema", None]
    corrective = chats[1].json["messages"]
    assert corrective[2]["role"] == "assistant" and "not valid json" in corrective[2]["content"]
    assert corrective[3]["content"].startswith("Your reply was not valid: not JSON")
    assert sum("invalid output" in r.message for r in caplog.records) == 2


async def test_scorer_failure_fails_the_generation_without_a_score(server, tmp_path):
    settings = make_settings(server, tmp_path)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_id()
    store.create(gid, "alice", request().model_dump(), offline=False)
    result = await execute_job(store, claim(store, gid), make_services(settings, PixelScoring(fail=True)), settings)

    assert result is None
    record = store.get(gid)
    assert record.status == "failed"
    assert record.error.startswith("scene 1: scoring failed") and "unavailable" in record.error
    assert store.scenes(gid) == []
    # The failed attempt's files are kept in its own folder, never under the guide's names,
    # which only a run whose checkpoint was accepted writes.
    assert not (settings.traces.root / gid / "scene_1" / "quality_scores.json").exists()
    [kept] = (settings.traces.root / gid / "scene_1").glob("attempt_*/quality_scores.json")
    quality = read_json(kept)
    assert all(v["overall"] is None and v["scores"] == {} for v in quality["variations"])
    store.close()


async def test_quality_below_threshold_warns_and_continues(server, tmp_path, caplog):
    settings = make_settings(server, tmp_path, keep=True)
    gid = new_id()
    with caplog.at_level(logging.WARNING, logger="sceneref.runner"):
        scenes = await run_generation(
            gid, request(advanced_image_quality_threshold=100), make_services(settings), settings
        )
    assert len(scenes) == 4 and all(s.below_threshold for s in scenes)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "below the threshold" in r.message]
    assert len(warnings) == 4
    assert "WARNING" in (settings.traces.root / gid / "scene_4" / "selected_best.txt").read_text()


async def test_all_scenes_are_enhanced_concurrently_before_generation(server, tmp_path):
    server.chat_latency_s = 0.2
    settings = make_settings(server, tmp_path)
    scenes = await run_generation(new_id(), request(), make_services(settings), settings)
    assert len(scenes) == 4
    chats = [r for r in server.requests_for("chat") if chat_task(r) != "storyboard"]
    images = server.requests_for("generations") + server.requests_for("edits")
    assert server.max_in_flight["chat"] == 4  # one agent call per scene in flight at once
    # every enhancement call started before the first image request
    assert max(r.started for r in chats) < min(r.started for r in images)
    # the four scenes' first rewrite started together, not one after another
    firsts = [r.started for r in chats if chat_task(r) == "cinematographer" and chat_payload(r)["iteration"] == 1]
    assert len(firsts) == 4 and max(firsts) - min(firsts) < 0.3  # sequential would be >= 0.6
