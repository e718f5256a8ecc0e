"""What the ingress answers about the stores behind it, without Serve: the real Ingress class's
routes (deployments.api.create_api) over HTTP in this event loop (httpx's ASGI transport), a
SQLite job store, a real SeaweedFS server the test stops and starts, and for the cancel race
a real job run by execute_job against the local OpenAI-compatible double.

- POST /api/generate answers 503 with Retry-After while the object store cannot be reached,
  and stores nothing; it accepts again once the store is back.
- DELETE /api/generations/{id} says what happened: for a job whose last scene is finishing the
  answer is the job's real end (`completed`), never a promise of a cancel that did not happen.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

import deployments.ingress as ingress_module
from deployments.api import create_api
from deployments.args import AppArgs
from deployments.auth import Authenticator, AuthSettings, mint_token
from deployments.readiness import StoreCheck, ping_object_store
from pipeline.jobs.store import JobStore
from pipeline.storage.factory import open_store
from pipeline.providers.openai_clients import OpenAIChat, OpenAIImages
from pipeline.runner import ProgressEvent, Services
from pipeline.schemas import GenerationRequest
from pipeline.jobs.run import execute_job
from pipeline.jobs.worker import JobSettings, JobWorker
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings, RetrySettings, TraceSettings
from testkit.doubles import FakeOpenAIServer, PixelScoring

SECRET = "test-secret-" + "y" * 40
KEY_ENV = "SCENEREF_TEST_OPENAI_KEY"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.5)
BODY = {"prompt": "Artisan coffee that starts your morning right", "target_duration": 10,
        "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}


class Ready:
    """Serve's controller, as the ingress's readiness check reports it: every deployment live."""

    async def check(self):
        return SimpleNamespace(ready=True, checked=True)


def ingress(tmp_path, settings: PipelineSettings, store: JobStore, *, cache_s: float = 2.0):
    """The Ingress class's state as its constructor makes it, minus Serve's handles."""
    server = object.__new__(ingress_module.Ingress.func_or_class)
    server.args = AppArgs(pipeline=settings)
    server.settings = settings
    server.store = store
    server.artifacts = open_store(settings.artifacts_dir, settings.s3)
    server.trace_store = open_store(settings.traces.root, settings.s3)
    server.store_check = StoreCheck({
        "job store": store.ping,
        "object store": functools.partial(ping_object_store, server.artifacts),
        "trace store": functools.partial(ping_object_store, server.trace_store),
    }, cache_s=cache_s)
    server.readiness = Ready()
    server.offline = True
    server.worker = JobWorker(store, None, settings, JobSettings(), holder="this-replica")  # not started
    server.api_pool = ThreadPoolExecutor(max_workers=4)
    return server


@pytest.fixture
def client_for(monkeypatch):
    monkeypatch.setenv("SCENEREF_JWT_SECRET", SECRET)
    opened = []

    def make(server) -> httpx.AsyncClient:
        app = create_api(server, authenticator=Authenticator(AuthSettings()), upload_limit_bytes=10_000_000)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sceneref.test",
                                   headers={"Authorization": f"Bearer {mint_token(SECRET, 'alice')}"})
        opened.append((client, server))
        return client

    yield make
    for client, server in opened:
        server.api_pool.shutdown(wait=False)


# --- submissions while the object store is down -----------------------------------------------


async def test_generate_answers_503_while_the_object_store_is_down(s3_outage, tmp_path, client_for):
    location = f"s3://{s3_outage.server.bucket}/t-{uuid.uuid4().hex[:12]}"
    settings = PipelineSettings(artifacts_dir=f"{location}/artifacts", s3=s3_outage.server.settings(),
                                traces=TraceSettings(root=f"{location}/traces"))
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    server = ingress(tmp_path, settings, store, cache_s=0)
    async with client_for(server) as client:
        await asyncio.to_thread(s3_outage.stop)
        try:
            answer = await client.post("/api/generate", json=BODY)
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "5"
            assert "object store" in answer.json()["detail"]
            assert store.count_active("alice") == 0  # nothing was stored
        finally:
            await asyncio.to_thread(s3_outage.start)
        answer = await client.post("/api/generate", json=BODY)
        assert answer.status_code == 202, answer.text
        assert store.get(answer.json()["generation_id"], "alice").status == "queued"
    store.close()


# --- the cancel answer ------------------------------------------------------------------------


class HeldAtTheEnd(JobStore):
    """A real job store whose final-status write waits until a cancel has been recorded: pins
    the race of a cancel with a job whose every scene is already checkpointed."""

    def __init__(self, url: str):
        super().__init__(url)
        self.cancel_recorded = threading.Event()

    def request_cancel(self, generation_id: str, owner: str) -> bool:
        found = super().request_cancel(generation_id, owner)
        self.cancel_recorded.set()
        return found

    def finish(self, *args, **kwargs):
        assert self.cancel_recorded.wait(60), "no cancel was recorded"
        return super().finish(*args, **kwargs)


@pytest.fixture(scope="module")
def openai_double():
    with FakeOpenAIServer() as fake:
        yield fake


def local_settings(openai_double, tmp_path) -> PipelineSettings:
    return PipelineSettings(
        llm=LLMSettings(base_url=openai_double.base_url, api_key_env=KEY_ENV, model="test-chat", retry=FAST_RETRY,
                        timeout_s=5.0),
        images=ImageSettings(base_url=openai_double.base_url, api_key_env=KEY_ENV, model="gpt-image-1", size="64x36",
                             retry=FAST_RETRY, timeout_s=5.0),
        traces=TraceSettings(root=tmp_path / "traces"),
        artifacts_dir=tmp_path / "artifacts",
    )


async def test_a_cancel_racing_the_last_scene_answers_how_the_job_really_ended(
    openai_double, tmp_path, client_for, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "test-key")
    settings = local_settings(openai_double, tmp_path)
    store = HeldAtTheEnd(f"sqlite:///{tmp_path}/db.sqlite")
    server = ingress(tmp_path, settings, store)
    gid = uuid.uuid4().hex
    store.create(gid, "alice", GenerationRequest(**BODY).model_dump(), offline=False)
    services = Services(chat=OpenAIChat(settings.llm), images=OpenAIImages(settings.images), scoring=PixelScoring(),
                        artifacts=server.artifacts, traces=server.trace_store)
    async with client_for(server) as client:
        answers: list[asyncio.Task] = []

        def on_event(event: ProgressEvent) -> None:  # every scene is checkpointed: now the user cancels
            if event.kind == "selected" and event.scene == event.total_scenes and not answers:
                answers.append(asyncio.ensure_future(client.delete(f"/api/generations/{gid}")))

        lease = store.claim("this-replica", 30, generation_id=gid)
        server.worker.tasks[gid] = asyncio.ensure_future(execute_job(store, lease, services, settings, on_event=on_event))
        await asyncio.wait([server.worker.tasks[gid]], timeout=120)
        assert answers, "the last scene was never selected"
        answer = await asyncio.wait_for(answers[0], 60)
    record = store.get(gid)
    assert record.status == "completed"  # the cancel came too late to stop anything
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["cancel_requested"] is True
    assert (body["status"], body["final"]) == ("completed", True)  # the answer says how it really ended
    assert "completed before the cancel" in body["message"]
    store.close()


async def test_a_queued_job_is_cancelled_and_the_answer_says_so(tmp_path, client_for):
    settings = PipelineSettings(artifacts_dir=tmp_path / "artifacts", traces=TraceSettings(root=tmp_path / "traces"))
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    server = ingress(tmp_path, settings, store)
    async with client_for(server) as client:
        gid = (await client.post("/api/generate", json=BODY)).json()["generation_id"]
        body = (await client.delete(f"/api/generations/{gid}")).json()
        assert (body["status"], body["final"], body["cancel_requested"]) == ("cancelled", True, True)
        assert store.get(gid).status == "cancelled"

        # Running on another replica (its lease is live): recorded, the outcome not yet known.
        gid = (await client.post("/api/generate", json=BODY)).json()["generation_id"]
        assert store.claim("another-replica", 30, generation_id=gid) is not None
        body = (await client.delete(f"/api/generations/{gid}")).json()
        assert (body["status"], body["final"], body["cancel_requested"]) == ("running", False, True)
        assert "ends `cancelled`" in body["message"] and "`completed`" in body["message"]
        assert store.cancel_requested(gid)
    store.close()
