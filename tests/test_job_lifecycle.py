"""execute_job around a lease (pipeline/jobs/run.py), with the offline providers and pixel
scoring: the stored user image is scene 1, best-effort progress, retried checkpoints,
"all scenes checkpointed" means completed, lost leases write nothing, cancellation from the
owner or from outside, resumption of a failed job."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image
from sqlalchemy.exc import OperationalError

from pipeline import runner
from pipeline.jobs.store import JobStore
from pipeline.jobs.tables import jobs_table
from pipeline.storage.objectstore import LocalObjectStore
from pipeline.providers.offline import OfflineChat, OfflineImages
from pipeline.runner import GenerationError, Services
from pipeline.schemas import GenerationRequest
from pipeline.jobs.run import execute_job, run_claimed
from pipeline.settings import PipelineSettings
from testkit.doubles import PixelScoring
from tests.waiting import until_settled

REQUEST = GenerationRequest(
    prompt="Artisan coffee that starts your morning right",
    target_duration=9,
    advanced_image_num_variations=2,
    advanced_image_max_enhancement_iterations=1,
).model_dump(mode="json")


def locked() -> OperationalError:
    return OperationalError("UPDATE jobs ...", {}, Exception("database is locked"))


@pytest.fixture
def settings(tmp_path):
    return PipelineSettings.offline(tmp_path)


@pytest.fixture
def store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    yield store
    store.close()


def services(settings, *, chat_latency_s: float = 0.0, scoring: PixelScoring | None = None) -> Services:
    return Services(
        chat=OfflineChat(latency_s=chat_latency_s),
        images=OfflineImages(settings.images),
        scoring=scoring or PixelScoring(),
        artifacts=LocalObjectStore(settings.artifacts_dir),
    )


def png(colour=(30, 60, 200), size=(96, 54)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


async def test_completes_with_the_stored_user_image_as_scene_one(store, settings):
    svc = services(settings)
    mine = png()
    key = svc.artifacts.put("gen-1/scene_1/user_reference.png", mine)
    store.create("gen-1", "alice", REQUEST, offline=True, reference_key=key)
    lease = store.claim("runner-a", 30)
    scenes = await execute_job(store, lease, svc, settings, lease_s=30)
    assert [s.scene_number for s in scenes] == [1, 2, 3]
    assert scenes[0].user_provided and scenes[0].reference_image_key == key
    assert svc.artifacts.get(key) == mine
    record = store.get("gen-1")
    assert (record.status, record.progress, record.lease_holder, record.error) == ("completed", 100, None, None)


async def test_failing_progress_writes_never_fail_the_job(store, settings, monkeypatch):
    store.create("gen-1", "alice", REQUEST, offline=True)
    failures = []

    def flaky_append(generation_id, events, lease=None, **fields):  # progress goes with the events
        failures.append(fields.get("progress"))
        raise locked()

    monkeypatch.setattr(store, "append_events", flaky_append)
    monkeypatch.setattr("pipeline.jobs.run._EventWriter.RETRY_S", 0.01)
    scenes = await execute_job(store, store.claim("runner-a", 30), services(settings), settings)
    assert failures and scenes is not None
    assert store.get("gen-1").status == "completed"


async def test_transient_checkpoint_errors_are_retried(store, settings, monkeypatch):
    store.create("gen-1", "alice", REQUEST, offline=True)
    real = store.checkpoint_scene
    attempts: list[int] = []

    def flaky_checkpoint(generation_id, scene, lease=None):
        attempts.append(scene.scene_number)
        if attempts.count(scene.scene_number) == 1:
            raise locked()
        return real(generation_id, scene, lease)

    monkeypatch.setattr(store, "checkpoint_scene", flaky_checkpoint)
    assert await execute_job(store, store.claim("runner-a", 30), services(settings), settings) is not None
    assert sorted(attempts) == [1, 1, 2, 2, 3, 3]
    assert [s.scene_number for s in store.scenes("gen-1")] == [1, 2, 3]


async def test_all_scenes_checkpointed_means_completed_whatever_fails_after(store, settings, monkeypatch):
    store.create("gen-1", "alice", REQUEST, offline=True)

    def broken_cleanup(self):
        raise OSError("trace store unreachable")

    monkeypatch.setattr(runner.TraceWriter, "cleanup", broken_cleanup)
    scenes = await execute_job(store, store.claim("runner-a", 30), services(settings), settings)
    assert [s.scene_number for s in scenes] == [1, 2, 3]
    record = store.get("gen-1")
    assert (record.status, record.error) == ("completed", None)


async def test_failure_keeps_reason_and_requeue_resumes_at_next_scene(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)
    assert await execute_job(store, store.claim("runner-a", 30), services(settings, scoring=PixelScoring(fail=True)), settings) is None
    record = store.get("gen-1")
    assert record.status == "failed" and "pickscore" in record.error and record.lease_holder is None
    assert store.claim("runner-b", 30) is None  # failed jobs are not picked up by themselves
    assert store.requeue("gen-1", "alice")
    assert await run_claimed(store, "runner-b", services(settings), settings, lease_s=30) is True
    record = store.get("gen-1")
    assert (record.status, record.error, record.lease_token) == ("completed", None, 2)
    assert await run_claimed(store, "runner-b", services(settings), settings, lease_s=30) is False


async def test_retryable_generation_error_says_the_job_can_be_resumed(store, settings, monkeypatch):
    store.create("gen-1", "alice", REQUEST, offline=True)

    async def gone(*args, **kwargs):
        error = GenerationError("scene 2: the image generator replica went away")
        error.retryable = True
        raise error

    monkeypatch.setattr("pipeline.jobs.run.run_generation", gone)
    assert await execute_job(store, store.claim("runner-a", 30), services(settings), settings) is None
    error = store.get("gen-1").error
    assert error.startswith("scene 2: the image generator replica went away") and "resumed" in error


async def test_a_runner_that_lost_its_lease_stops_and_writes_nothing(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)
    lease = store.claim("runner-a", 30)
    seen: dict = {}

    def steal(event):
        if event.stage == "enhancing" and not seen:
            with store.engine.begin() as conn:  # runner-a stalls past its lease ...
                conn.execute(jobs_table.update().values(lease_expires_at=lease.expires_at.replace(year=2000)))
            seen["thief"] = store.claim("runner-b", 30)  # ... and runner-b takes over
            seen["row"] = store.get("gen-1")

    before = asyncio.all_tasks()
    assert await execute_job(store, lease, services(settings, chat_latency_s=0.05), settings, on_event=steal) is None
    await until_settled(before)  # every task the run started has ended: nothing of it can write later
    assert seen["thief"].token == 2
    assert store.get("gen-1") == seen["row"]  # not one write after the takeover
    assert store.scenes("gen-1") == []


async def test_owner_cancel_stops_the_run_at_its_next_step(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)

    def cancel(event):
        if event.stage == "enhancing":
            store.request_cancel("gen-1", "alice")

    svc = services(settings, chat_latency_s=0.1)
    # A long lease (a slow machine cannot lose it between renewals) and a quick cancel poll: the
    # run must end because the owner asked, not because its lease lapsed.
    result = await execute_job(store, store.claim("runner-a", 30), svc, settings, lease_s=30, cancel_poll_s=0.05, on_event=cancel)
    assert result is None
    record = store.get("gen-1")
    assert (record.status, record.stage, record.lease_holder) == ("cancelled", "cancelled", None)
    assert record.finished_at is not None and len(store.scenes("gen-1")) < 3


async def test_cancelled_from_outside_releases_the_job_for_anyone(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)
    started = asyncio.Event()
    task = asyncio.ensure_future(
        execute_job(store, store.claim("runner-a", 30), services(settings, chat_latency_s=0.1), settings,
                    on_event=lambda e: started.set())
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = store.get("gen-1")
    assert (record.status, record.lease_holder) == ("running", None)  # resumable, not stuck
    assert store.claim("runner-b", 30).token == 2


async def test_cancelled_from_outside_after_the_owner_asked_ends_cancelled(store, settings):
    store.create("gen-1", "alice", REQUEST, offline=True)
    started = asyncio.Event()
    task = asyncio.ensure_future(
        execute_job(store, store.claim("runner-a", 30), services(settings, chat_latency_s=0.1), settings,
                    on_event=lambda e: started.set())
    )
    await started.wait()
    store.request_cancel("gen-1", "alice")
    task.cancel()  # what the ingress does when the job runs on its own replica
    with pytest.raises(asyncio.CancelledError):
        await task
    record = store.get("gen-1")
    assert (record.status, record.lease_holder) == ("cancelled", None)


@pytest.mark.parametrize("owner_asked", [True, False])
async def test_cancelled_before_the_run_starts_still_ends_or_releases_the_job(store, settings, owner_asked):
    """The CLI's Ctrl-C (or an ingress shutdown) can land while execute_job is still reading the
    job: that must not leave it `running`, held by a runner that has gone."""
    import threading

    store.create("gen-1", "alice", REQUEST, offline=True)
    lease = store.claim("runner-a", 30)
    entered, go_on = threading.Event(), threading.Event()
    real_scenes = store.scenes

    def slow_scenes(gid):
        entered.set()
        go_on.wait(5)
        return real_scenes(gid)

    store.scenes = slow_scenes
    task = asyncio.ensure_future(execute_job(store, lease, services(settings), settings))
    await asyncio.to_thread(entered.wait, 5)
    if owner_asked:
        store.request_cancel("gen-1", "alice")
    task.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.scenes = real_scenes
    record = store.get("gen-1")
    assert record.lease_holder is None
    assert record.status == ("cancelled" if owner_asked else "running")
