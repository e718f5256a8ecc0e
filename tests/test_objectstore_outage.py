"""Object-store outages against a real SeaweedFS server that the test stops and starts again
(same ports, same data): what a store call says, and what a running generation does.

An outage shorter than `S3Settings.outage_wait_s` must lose nothing and need no user action (the
generation waits and goes on by itself); a longer one ends it `failed` as a transient error that
a resume continues, never as an internal error. Chat and images go through the real `openai`
client against the local FakeOpenAIServer, scoring through PixelScoring, the job store is SQLite.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from pipeline.jobs.store import JobStore
from pipeline.storage.objectstore import ObjectStoreError, ObjectStoreUnavailable
from pipeline.storage.factory import open_store
from pipeline.providers.openai_clients import OpenAIChat, OpenAIImages
from pipeline.runner import ProgressEvent, Services
from pipeline.storage.s3 import S3ObjectStore
from pipeline.schemas import GenerationRequest
from pipeline.jobs.run import execute_job
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings, RetrySettings, TraceSettings
from testkit.doubles import FakeOpenAIServer, PixelScoring

KEY_ENV = "SCENEREF_TEST_OPENAI_KEY"
FAST_RETRY = RetrySettings(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.5)
STORY = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"
RUN_LIMIT_S = 180  # a generation that neither ends nor fails within this is a hang, not slowness


def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


# --- the store's own answers ------------------------------------------------------------------


def test_a_stopped_server_is_an_outage_not_a_configuration_error(s3_outage):
    store = S3ObjectStore(s3_outage.server.bucket, prefix(), s3_outage.server.settings())
    store.put("gen1/a.txt", b"before")
    store.ping()
    s3_outage.stop()
    try:
        for call in (lambda: store.put("gen1/b.txt", b"x"), lambda: store.get("gen1/a.txt"), store.ping,
                     lambda: store.list("gen1")):
            with pytest.raises(ObjectStoreUnavailable) as caught:
                call()
            message = str(caught.value)
            assert "outage" in message and "endpoint_url" not in message, message
            assert caught.value.retryable is True
    finally:
        s3_outage.start()
    assert store.get("gen1/a.txt") == b"before"  # the same data dir: nothing was lost
    store.put("gen1/b.txt", b"after")
    store.ping()


def test_an_unreachable_endpoint_at_start_names_the_setting(s3_outage):
    settings = s3_outage.server.settings(endpoint_url="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ObjectStoreError) as caught:
        S3ObjectStore(s3_outage.server.bucket, prefix(), settings)
    assert not isinstance(caught.value, ObjectStoreUnavailable)
    assert "endpoint_url" in str(caught.value)


def test_the_local_store_pings(tmp_path):
    store = open_store(tmp_path / "artifacts")
    store.ping()
    assert (tmp_path / "artifacts").is_dir()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ObjectStoreUnavailable):
        open_store(tmp_path / "file" / "below").ping()


# --- a running generation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    yield
    server.reset()


def s3_settings(server, weed, outage_wait_s: float) -> PipelineSettings:
    location = f"s3://{weed.server.bucket}/{prefix()}"
    return PipelineSettings(
        llm=LLMSettings(base_url=server.base_url, api_key_env=KEY_ENV, model="test-chat", retry=FAST_RETRY, timeout_s=5.0),
        images=ImageSettings(base_url=server.base_url, api_key_env=KEY_ENV, model="gpt-image-1", size="64x36",
                             retry=FAST_RETRY, timeout_s=5.0),
        traces=TraceSettings(root=f"{location}/traces", keep=True),
        artifacts_dir=f"{location}/artifacts",
        s3=weed.server.settings(outage_wait_s=outage_wait_s),
    )


def services(settings: PipelineSettings) -> Services:
    return Services(
        chat=OpenAIChat(settings.llm),
        images=OpenAIImages(settings.images),
        scoring=PixelScoring(),
        artifacts=open_store(settings.artifacts_dir, settings.s3),
        traces=open_store(settings.traces.root, settings.s3),
    )


def new_job(store: JobStore) -> str:
    gid = f"gen-{uuid.uuid4().hex[:12]}"
    request = GenerationRequest(prompt=STORY, target_duration=10, advanced_image_num_variations=2,
                                advanced_image_max_enhancement_iterations=1)
    store.create(gid, "alice", request.model_dump(), offline=False)
    return gid


class Outage:
    """on_event: when scene 1 is selected, stop the server (the next read is scene 2's chain
    image); start it again `restart_after_s` later in a thread, or not at all (None).
    `end()` leaves the server running whatever happened, for the next test."""

    def __init__(self, weed, restart_after_s: float | None):
        self.weed, self.restart_after_s = weed, restart_after_s
        self.stopped = threading.Event()
        self.timer: threading.Timer | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "selected" and event.scene == 1 and not self.stopped.is_set():
            self.weed.stop()
            self.stopped.set()
            if self.restart_after_s is not None:
                self.timer = threading.Timer(self.restart_after_s, self.weed.start)
                self.timer.start()

    def end(self) -> None:
        if self.timer is not None:
            self.timer.join()
        if self.weed.process is None:
            self.weed.start()


async def test_an_outage_shorter_than_the_bound_loses_nothing_and_needs_no_action(server, s3_outage, tmp_path):
    settings = s3_settings(server, s3_outage, outage_wait_s=90)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_job(store)
    outage = Outage(s3_outage, restart_after_s=3.0)
    lease = store.claim("test-runner", 30, generation_id=gid)
    try:
        scenes = await asyncio.wait_for(execute_job(store, lease, services(settings), settings, on_event=outage), RUN_LIMIT_S)
    finally:
        await asyncio.to_thread(outage.end)
    assert outage.stopped.is_set()  # the outage did happen mid-generation
    record = store.get(gid)
    assert (record.status, record.error) == ("completed", None)
    assert [s.scene_number for s in scenes] == [1, 2, 3]  # 10 s: three scenes
    artifacts = open_store(settings.artifacts_dir, settings.s3)
    for scene in scenes:  # every selected image is in the store, readable
        assert artifacts.get(scene.reference_image_key)[:8] == b"\x89PNG\r\n\x1a\n"
    traces = open_store(settings.traces.root, settings.s3)
    assert any(key.endswith("scene_3/selected_best.txt") for key in traces.list(gid))
    store.close()


async def test_an_outage_longer_than_the_bound_ends_the_job_resumable(server, s3_outage, tmp_path, caplog):
    settings = s3_settings(server, s3_outage, outage_wait_s=1.5)
    store = JobStore(f"sqlite:///{tmp_path}/db.sqlite")
    gid = new_job(store)
    outage = Outage(s3_outage, restart_after_s=None)
    run_services = services(settings)
    lease = store.claim("test-runner", 30, generation_id=gid)
    try:
        result = await asyncio.wait_for(execute_job(store, lease, run_services, settings, on_event=outage), RUN_LIMIT_S)
    finally:
        await asyncio.to_thread(outage.end)
    assert result is None and outage.stopped.is_set()
    record = store.get(gid)
    assert record.status == "failed"
    assert "internal error" not in record.error
    assert "object store" in record.error and "outage" in record.error
    assert record.error.endswith("(a transient error: the job can be resumed)")
    assert [s.scene_number for s in store.scenes(gid)] == [1]
    # The log tells the outage apart from a configuration error.
    logged = caplog.text
    assert "stopped answering" in logged and "set pipeline.s3.endpoint_url" not in logged

    # The server is back: a resume continues at scene 2 and completes.
    assert store.requeue(gid, "alice")
    lease = store.claim("test-runner", 30, generation_id=gid)
    scenes = await asyncio.wait_for(execute_job(store, lease, run_services, settings), RUN_LIMIT_S)
    assert [s.scene_number for s in scenes] == [1, 2, 3]
    assert store.get(gid).status == "completed"
    store.close()


def test_the_app_refuses_an_outage_bound_below_the_lease():
    from pydantic import ValidationError

    from deployments.args import AppArgs

    with pytest.raises(ValidationError, match=r"pipeline.s3.outage_wait_s \(10\) must be at least jobs.lease_s \(30\)"):
        AppArgs.model_validate({"pipeline": {"s3": {"outage_wait_s": 10}}, "jobs": {"lease_s": 30}})
    assert AppArgs.model_validate({"pipeline": {"s3": {"outage_wait_s": 30}}, "jobs": {"lease_s": 30}})
