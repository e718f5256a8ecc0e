"""execute_job writes every runner event to the job's event log (pipeline/jobs/run.py): in the
runner's order, with the detail the SSE stream and the viewer show, closed by the final status
event for completed, failed and cancelled jobs; a failing event write never fails the job."""

from __future__ import annotations

import asyncio

from pipeline.jobs.tables import FINAL_EVENT
from pipeline.providers.offline import OfflineImages
from pipeline.providers.base import ProviderError
from pipeline.jobs.run import execute_job
from tests.test_job_lifecycle import REQUEST, locked, services, settings, store  # noqa: F401 (fixtures)


async def test_a_completed_job_logs_every_choice_in_order(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)
    seen = []
    scenes = await execute_job(store, store.claim("runner-a", 30), services(settings), settings, on_event=seen.append)
    assert scenes is not None
    events = store.events_after("gen-1", "alice").events
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [e.kind for e in events]
    # The log holds what on_event saw, between the submission's and the final status's events.
    assert kinds == ["queued", *[e.kind for e in seen], FINAL_EVENT]
    assert kinds[1:3] == ["planning", "planned"] and kinds[-2] == "completed"
    assert events[-1].data["status"] == "completed" and events[-1].progress == 100
    assert [e.progress for e in events] == sorted(e.progress for e in events)
    planned = next(e for e in events if e.kind == "planned")
    assert [s["scene_number"] for s in planned.data["scenes"]] == [s.scene_number for s in scenes]
    for scene in scenes:
        mine = [e for e in events if e.scene == scene.scene_number]
        order = [e.kind for e in mine]
        assert order.index("iteration") < order.index("enhanced") < order.index("generating")
        assert order.index("generating") < order.index("variation") < order.index("scored") < order.index("selected")
        iteration = next(e for e in mine if e.kind == "iteration")
        assert iteration.data["iteration"] == 1 and 0 <= iteration.data["overall"] <= 100
        assert set(iteration.data["scores"]) == {"completeness", "specificity", "professionalism", "cinematography",
                                                 "brand_alignment"}
        received = sorted(e.data["variation"] for e in mine if e.kind == "variation" and e.data["ok"])
        assert received == [1, 2]
        scored = next(e for e in mine if e.kind == "scored").data["variations"]
        assert {v["variation"]: v["overall"] for v in scored} == {v.variation: v.overall for v in scene.variations}
        selected = next(e for e in mine if e.kind == "selected").data
        assert (selected["variation"], selected["overall"]) == (scene.selected_variation, scene.quality_score)
    assert store.get("gen-1").stage == "completed"


async def test_a_failed_job_ends_its_log_with_the_failure(store, settings, monkeypatch):
    async def refuse(self, prompt, **kwargs):
        raise ProviderError("content policy (test)", retryable=False)

    monkeypatch.setattr(OfflineImages, "generate", refuse)
    store.create("gen-1", "alice", REQUEST, offline=True)
    assert await execute_job(store, store.claim("runner-a", 30), services(settings), settings) is None
    events = store.events_after("gen-1", "alice").events
    failed = [e for e in events if e.kind == "variation"]
    assert failed and all(not e.data["ok"] and "content policy" in e.data["error"] for e in failed)
    assert events[-1].kind == FINAL_EVENT and events[-1].data["status"] == "failed"
    assert "no image could be generated" in events[-1].data["error"]


async def test_a_cancelled_job_ends_its_log_cancelled(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)
    started = asyncio.Event()

    def on_event(event):
        if event.kind == "planned":
            started.set()

    task = asyncio.ensure_future(execute_job(
        store, store.claim("runner-a", 30), services(settings, chat_latency_s=0.2), settings, on_event=on_event,
        cancel_poll_s=0.05,
    ))
    await started.wait()
    store.request_cancel("gen-1", "alice")
    assert await task is None
    events = store.events_after("gen-1", "alice").events
    assert [e.kind for e in events][:3] == ["queued", "planning", "planned"]
    assert events[-1].kind == FINAL_EVENT and events[-1].data["status"] == "cancelled"
    assert sum(e.kind == FINAL_EVENT for e in events) == 1


async def test_failing_event_writes_never_fail_the_job(store, settings, monkeypatch):
    store.create("gen-1", "alice", REQUEST, offline=True)
    real = store.append_events
    calls = []

    def sometimes_locked(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2:
            raise locked()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "append_events", sometimes_locked)
    monkeypatch.setattr("pipeline.jobs.run._EventWriter.RETRY_S", 0.01)
    assert await execute_job(store, store.claim("runner-a", 30), services(settings), settings) is not None
    events = store.events_after("gen-1", "alice").events
    assert len(calls) > 2 and events[-1].kind == FINAL_EVENT  # retried: every event landed in order
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.kind for e in events][:3] == ["queued", "planning", "planned"]
