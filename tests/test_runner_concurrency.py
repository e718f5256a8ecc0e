"""The runner's structured concurrency: a failure or a cancellation ends the whole generation at
once. Siblings are cancelled, nothing is emitted or written for them afterwards, CancelledError
is never swallowed, transient causes are marked retryable, and blocking I/O runs in worker
threads.

Providers here are small in-process fakes (no server), so each test controls exactly when each
call starts, waits and fails: events gate the slow calls instead of sleeps.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading

import pytest
from PIL import Image

import pipeline.runner as runner
from pipeline.storage.objectstore import LocalObjectStore
from pipeline.providers.base import GeneratedImage, ProviderError
from pipeline.runner import GenerationError, ProgressEvent, Services, run_generation
from pipeline.schemas import GenerationRequest, ScenePlan
from pipeline.settings import PipelineSettings, TraceSettings
from testkit.doubles import PixelScoring
from tests.waiting import until_settled

STORY = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"
BOARD = [ScenePlan(scene_number=n, duration=5, prompt=f"scene {n}: the Aurora lamp on a desk at dawn") for n in (1, 2, 3)]
REVIEW = {
    "scores": {"completeness": 95, "specificity": 95, "professionalism": 95, "cinematography": 95, "brand_alignment": 95},
    "critique": "fine",
    "improvements": [],
}


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 18), (shade, 255 - shade, 90)).save(out, format="PNG")
    return out.getvalue()


def settings_for(tmp_path, keep: bool = True) -> PipelineSettings:
    return PipelineSettings(traces=TraceSettings(root=tmp_path / "traces", keep=keep), artifacts_dir=tmp_path / "artifacts")


def request(**overrides) -> GenerationRequest:
    return GenerationRequest(prompt=STORY, target_duration=15, advanced_image_max_enhancement_iterations=1, **overrides)


def scene_of(messages) -> int:
    return int(json.loads(messages[1]["content"])["scene_prompt"].split(":")[0].split()[1])


class GatedChat:
    """Agent calls for `slow` scenes wait on `release`; a call for `failing` raises `error` once
    every slow scene's call is in flight. Records cancellations and the order of things in `log`."""

    def __init__(self, log: list, *, slow=(), failing=None, error: BaseException | None = None):
        self.log, self.slow, self.failing, self.error = log, set(slow), failing, error
        self.release = asyncio.Event()
        self.waiting: set[int] = set()
        self.cancelled: list[int] = []

    async def complete(self, messages, *, task) -> str:
        scene = scene_of(messages)
        if scene == self.failing:
            while self.waiting != self.slow:
                await asyncio.sleep(0)
            self.log.append(("raised", scene))
            raise self.error
        if scene in self.slow:
            self.waiting.add(scene)
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(scene)
                raise
        self.log.append(("chat", scene, task))
        if task == "cinematographer":
            return json.dumps({"enhanced_prompt": f"scene {scene}: lamp, 35mm lens, warm 3200K key light"})
        return json.dumps(REVIEW)


class GatedImages:
    """Variations in `slow` wait on `release`; the others answer at once."""

    def __init__(self, log: list, *, slow=()):
        self.log, self.slow = log, set(slow)
        self.release = asyncio.Event()
        self.waiting: set[int] = set()
        self.cancelled: list[int] = []

    async def generate(self, prompt, *, reference, variation) -> GeneratedImage:
        if variation in self.slow:
            self.waiting.add(variation)
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(variation)
                raise
        self.log.append(("image", variation))
        return GeneratedImage(data=png(40 * variation), metadata={"provider": "fake"})


def services_for(tmp_path, chat, images=None, scoring=None, artifacts=None) -> Services:
    return Services(
        chat=chat,
        images=images or GatedImages([]),
        scoring=scoring or PixelScoring(),
        artifacts=artifacts or LocalObjectStore(tmp_path / "artifacts"),
    )


async def settle() -> None:
    """Let the tasks that are ready run (for checks that a task is still blocked)."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


def after(log: list, marker: tuple) -> list:
    return log[log.index(marker) + 1 :]


# --- one failure ends the generation, siblings are cancelled ----------------------------------


async def test_a_failing_enhancement_cancels_the_other_scenes_and_nothing_follows(tmp_path):
    before = asyncio.all_tasks()
    log: list = []
    chat = GatedChat(log, slow={1, 3}, failing=2, error=RuntimeError("the agents replica died (fake)"))
    settings = settings_for(tmp_path)

    with pytest.raises(RuntimeError, match="agents replica died"):
        await run_generation(
            "gen-fail", request(), services_for(tmp_path, chat), settings, storyboard=BOARD,
            on_event=lambda e: log.append(("event", e.stage, e.scene)),
        )
    # The slow siblings were cancelled by the failure, not left to run.
    assert sorted(chat.cancelled) == [1, 3]
    chat.release.set()  # under asyncio.gather they would now go on calling the LLM and emitting
    await until_settled(before)  # whatever the run left behind has ended: nothing can follow now
    assert after(log, ("raised", 2)) == []
    for n in (1, 2, 3):
        assert not (settings.traces.root / "gen-fail" / f"scene_{n}" / "final_enhanced_prompt.txt").exists()


async def test_a_failing_variation_write_cancels_the_other_variations(tmp_path):
    before = asyncio.all_tasks()
    log: list = []

    class FailingStore(LocalObjectStore):
        def put(self, key, data):
            if key.endswith("variation_2.png"):
                log.append(("raised", 2))
                raise OSError("no space left on device (fake)")
            return super().put(key, data)

    images = GatedImages(log, slow={1, 3, 4})

    async def release_when_waiting(event: ProgressEvent) -> None:
        log.append(("event", event.stage, event.scene))

    chat = GatedChat(log)
    with pytest.raises(OSError, match="no space left"):
        await run_generation(
            "gen-var", request(), services_for(tmp_path, chat, images, artifacts=FailingStore(tmp_path / "a")),
            settings_for(tmp_path), storyboard=BOARD, on_event=release_when_waiting,
        )
    assert sorted(images.cancelled) == [1, 3, 4]
    images.release.set()
    await until_settled(before)  # whatever the run left behind has ended: nothing can follow now
    assert after(log, ("raised", 2)) == []
    assert not list((tmp_path / "a" / "gen-var" / "scene_1").rglob("variation_1.png"))


# --- cancellation from outside ----------------------------------------------------------------


async def test_cancelling_the_generation_cancels_enhancement_and_propagates(tmp_path):
    before = asyncio.all_tasks()
    log: list = []
    chat = GatedChat(log, slow={1, 2, 3})
    task = asyncio.create_task(
        run_generation(
            "gen-cancel", request(), services_for(tmp_path, chat), settings_for(tmp_path), storyboard=BOARD,
            on_event=lambda e: log.append(("event", e.stage, e.scene)),
        )
    )
    while chat.waiting != {1, 2, 3}:
        await asyncio.sleep(0)
    log.append(("cancel",))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(chat.cancelled) == [1, 2, 3]
    chat.release.set()
    await until_settled(before)  # whatever the run left behind has ended: nothing can follow now
    assert after(log, ("cancel",)) == []


async def test_cancelling_during_variations_propagates_and_checkpoints_nothing_more(tmp_path):
    before = asyncio.all_tasks()
    log: list = []
    images = GatedImages(log, slow={1, 2, 3, 4})
    scenes: list = []
    task = asyncio.create_task(
        run_generation(
            "gen-cancel2", request(), services_for(tmp_path, GatedChat(log), images), settings_for(tmp_path),
            storyboard=BOARD, on_scene=scenes.append, on_event=lambda e: log.append(("event", e.stage, e.scene)),
        )
    )
    while images.waiting != {1, 2, 3, 4}:
        await asyncio.sleep(0)
    log.append(("cancel",))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(images.cancelled) == [1, 2, 3, 4]
    images.release.set()
    await until_settled(before)  # whatever the run left behind has ended: nothing can follow now
    assert after(log, ("cancel",)) == [] and scenes == []


# --- retryable: the job owner can tell a user that resuming is worth it ------------------------


class FailingChat:
    def __init__(self, error: BaseException):
        self.error = error

    async def complete(self, messages, *, task) -> str:
        raise self.error


async def test_generation_error_is_retryable_only_for_transient_causes(tmp_path):
    settings = settings_for(tmp_path)
    assert GenerationError("x").retryable is False

    transient = FailingChat(ProviderError("chat failed after 4 attempts (HTTP 503)", retryable=True))
    with pytest.raises(GenerationError, match="storyboard planning failed") as info:
        await run_generation("gen-r1", request(), services_for(tmp_path, transient), settings)
    assert info.value.retryable is True

    final = FailingChat(ProviderError("HTTP 401: invalid key", retryable=False))
    with pytest.raises(GenerationError) as info:
        await run_generation("gen-r2", request(), services_for(tmp_path, final), settings)
    assert info.value.retryable is False


class FailingImages:
    def __init__(self, errors: dict[int, ProviderError]):
        self.errors = errors

    async def generate(self, prompt, *, reference, variation) -> GeneratedImage:
        raise self.errors[variation]


async def test_all_variations_failing_is_retryable_when_any_failure_was_transient(tmp_path):
    settings = settings_for(tmp_path)
    refused = ProviderError("HTTP 400: content policy (fake)", retryable=False)
    down = ProviderError("images failed after 4 attempts (HTTP 503)", retryable=True)

    policy = FailingImages({k: refused for k in range(1, 5)})
    with pytest.raises(GenerationError, match="no image could be generated") as info:
        await run_generation("gen-v1", request(), services_for(tmp_path, GatedChat([]), policy), settings, storyboard=BOARD)
    assert info.value.retryable is False

    mixed = FailingImages({1: refused, 2: down, 3: refused, 4: refused})
    with pytest.raises(GenerationError) as info:
        await run_generation("gen-v2", request(), services_for(tmp_path, GatedChat([]), mixed), settings, storyboard=BOARD)
    assert info.value.retryable is True


class UnavailableScoring:
    """A scoring client whose error says it is transient (as the Serve adapter's does)."""

    def __init__(self, retryable: bool):
        self.retryable = retryable

    async def score(self, images, prompts):
        error = RuntimeError("vqascore: no live replica after 120 s")
        error.retryable = self.retryable
        raise error


@pytest.mark.parametrize("retryable", [True, False])
async def test_a_scoring_failure_carries_its_transience(tmp_path, retryable):
    services = services_for(tmp_path, GatedChat([]), scoring=UnavailableScoring(retryable))
    with pytest.raises(GenerationError, match="scene 1: scoring failed: vqascore: no live replica") as info:
        await run_generation("gen-s", request(), services, settings_for(tmp_path), storyboard=BOARD)
    assert info.value.retryable is retryable


# --- after the last scene, nothing can fail the generation -------------------------------------


async def test_a_failing_trace_cleanup_does_not_fail_a_finished_generation(tmp_path, monkeypatch, caplog):
    def broken_cleanup(self):
        raise PermissionError("read-only file system (fake)")

    monkeypatch.setattr(runner.TraceWriter, "cleanup", broken_cleanup)
    events: list[ProgressEvent] = []
    with caplog.at_level(logging.WARNING, logger="sceneref.runner"):
        scenes = await run_generation(
            "gen-clean", request(), services_for(tmp_path, GatedChat([])), settings_for(tmp_path, keep=False),
            storyboard=BOARD, on_event=events.append,
        )
    assert [s.scene_number for s in scenes] == [1, 2, 3]
    assert events[-1].stage == "completed" and events[-1].progress == 100
    assert any("trace cleanup" in r.message and "read-only" in r.message for r in caplog.records)


# --- blocking I/O off the event loop ------------------------------------------------------------


async def test_writes_run_in_worker_threads_images_precede_the_checkpoint_and_traces_follow_it(tmp_path, monkeypatch):
    loop_thread = threading.get_ident()
    calls: list[tuple[str, bool]] = []

    class RecordingStore(LocalObjectStore):
        def put(self, key, data):
            calls.append(("put", threading.get_ident() == loop_thread))
            return super().put(key, data)

        def get(self, key):
            calls.append(("get", threading.get_ident() == loop_thread))
            return super().get(key)

    for name in ("original_prompt", "enhancement", "image", "quality_scores", "selected", "cleanup"):
        original = getattr(runner.TraceWriter, name)

        def recording(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, threading.get_ident() == loop_thread))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(runner.TraceWriter, name, recording)

    store = RecordingStore(tmp_path / "artifacts")
    stored_at_checkpoint: list[bool] = []

    def on_scene(scene) -> None:
        keys = [v.image_key for v in scene.variations] + [scene.reference_image_key]
        stored_at_checkpoint.append(all(store.exists(k) for k in keys))
        # Trace files are written only once the checkpoint is accepted (fencing): the scene's
        # are not there yet, the previous scene's are.
        traces = tmp_path / "traces" / "gen-io"
        stored_at_checkpoint.append((traces / f"scene_{scene.scene_number}" / "selected_best.txt").is_file())
        if scene.scene_number > 1:
            stored_at_checkpoint.append((traces / f"scene_{scene.scene_number - 1}" / "selected_best.txt").is_file())

    await run_generation(
        "gen-io", request(), services_for(tmp_path, GatedChat([]), artifacts=store), settings_for(tmp_path, keep=False),
        storyboard=BOARD, reference_image=png(7), on_scene=on_scene,
    )
    names = {name for name, _ in calls}
    assert {"put", "get", "original_prompt", "enhancement", "image", "quality_scores", "selected", "cleanup"} <= names
    assert [c for c in calls if c[1]] == []  # none of them on the event loop's thread
    assert stored_at_checkpoint == [True, False, True, False, True, True, False, True]


async def test_a_cancelled_generation_ends_only_after_its_write_in_progress_has_landed(tmp_path):
    entered, proceed = threading.Event(), threading.Event()

    class SlowStore(LocalObjectStore):
        def put(self, key, data):
            entered.set()
            proceed.wait(30)
            return super().put(key, data)

    store = SlowStore(tmp_path / "artifacts")
    task = asyncio.create_task(
        run_generation("gen-w", request(), services_for(tmp_path, GatedChat([]), artifacts=store),
                       settings_for(tmp_path), storyboard=BOARD)
    )
    while not entered.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    await settle()
    assert not task.done()  # still waiting for the write it cannot stop half-way
    proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert any((tmp_path / "artifacts" / "gen-w" / "scene_1").rglob("variation_*.png"))


async def test_trace_images_name_the_stored_artifacts_instead_of_copying_them(tmp_path):
    scenes = await run_generation(
        "gen-once", request(), services_for(tmp_path, GatedChat([])), settings_for(tmp_path, keep=True), storyboard=BOARD
    )
    for scene in scenes:
        for v in scene.variations:
            trace = tmp_path / "traces" / "gen-once" / f"scene_{scene.scene_number}" / f"image_{v.variation}.png"
            artifact = tmp_path / "artifacts" / v.image_key
            assert trace.read_bytes() == artifact.read_bytes()
            assert trace.stat().st_ino == artifact.stat().st_ino  # one file, two names
