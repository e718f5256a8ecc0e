"""Fencing of artifacts and traces: a runner that lost its lease but is still alive (a long
pause, a partition from the database) writes late, and the bytes behind the scenes the new
owner checkpointed, and their trace files, stay exactly as the new owner left them.

Two runners share one job store and one pair of object stores (local directories, or S3 on
the session's SeaweedFS). Runner A claims the job, finishes scene 1 and then stalls in scene 2
while its lease renewals hang (the partition); its lease expires, runner B claims the job and
completes it. Then A goes on. A draws images no other runner draws (a flat colour), so a single
byte of A's landing where B's are shows.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading

import pytest
from PIL import Image

from pipeline.jobs.store import JobStore
from pipeline.storage.objectstore import LocalObjectStore
from pipeline.storage.factory import open_store
from pipeline.providers.offline import OfflineChat, OfflineImages
from pipeline.providers.base import GeneratedImage
from pipeline.runner import Services
from pipeline.schemas import GenerationRequest
from pipeline.jobs.run import execute_job
from pipeline.settings import PipelineSettings
from pipeline.traces import TraceStore
from testkit.doubles import PixelScoring

REQUEST = GenerationRequest(
    prompt="Artisan coffee that starts your morning right",
    target_duration=9,
    advanced_image_num_variations=2,
    advanced_image_max_enhancement_iterations=1,
).model_dump(mode="json")
LEASE_S = 1.0
WAIT_S = 60.0  # the most any wait below waits for its event before the test fails


def flat(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 54), colour).save(out, format="PNG")
    return out.getvalue()


async def until(condition, what: str) -> None:
    """Wait for an event the test caused; bounded, so a broken run fails instead of hanging."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


class Partitioned:
    """Runner A's view of the job store: once `cut` is set its lease renewals hang until
    `healed` (the database is out of reach; A's keeper cannot notice that its lease is gone)."""

    def __init__(self, store: JobStore):
        self.store = store
        self.cut, self.healed = threading.Event(), threading.Event()

    def renew(self, lease, lease_s):
        if self.cut.is_set():
            self.healed.wait(WAIT_S)
        return self.store.renew(lease, lease_s)

    def __getattr__(self, name):
        return getattr(self.store, name)


class StaleImages:
    """Runner A's images: scene 1 as usual; a chained scene waits for `go`, then answers a flat
    magenta image that no other runner draws."""

    def __init__(self, inner):
        self.inner = inner
        self.waiting, self.go = asyncio.Event(), asyncio.Event()

    async def generate(self, prompt, *, reference, variation):
        if reference is None:
            return await self.inner.generate(prompt, reference=reference, variation=variation)
        self.waiting.set()
        await self.go.wait()
        return GeneratedImage(data=flat((250, 0, 250 - variation)), metadata={"provider": "stale"})


class SlowWrites:
    """Runner A's artifact store: with `hold` set, a write of a chained scene's image starts
    (`writing`) and lands only when `land` is set; `landed` lists the keys that did."""

    def __init__(self, store, hold: bool):
        self.store, self.hold = store, hold
        self.writing, self.land = threading.Event(), threading.Event()
        self.landed: list[str] = []

    def put(self, key, data, content_type=None):
        if self.hold and "/scene_1/" not in key:
            self.writing.set()
            self.land.wait(WAIT_S)
        result = self.store.put(key, data, content_type)
        self.landed.append(key)
        return result

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "artifacts"), LocalObjectStore(tmp_path / "traces")
    where = request.getfixturevalue("s3_location")
    return open_store(f"{where.url}/artifacts", where.settings), open_store(f"{where.url}/traces", where.settings)


def snapshot(store: JobStore, artifacts, traces, gid: str):
    """Everything a reader of the generation sees: its checkpoints, the bytes of every image they
    name, and every trace file as the trace routes read it."""
    scenes = store.scenes(gid)
    keys = {s.reference_image_key for s in scenes} | {v.image_key for s in scenes for v in s.variations if v.image_key}
    reader = TraceStore(traces, artifacts)
    files = {name: reader.read_file(gid, name) for name in reader.list_files(gid)}
    return [s.model_dump(mode="json") for s in scenes], {k: artifacts.get(k) for k in keys}, files


@pytest.mark.parametrize("late", ["after_the_stall", "in_flight_when_the_loss_is_seen"])
async def test_a_runner_that_lost_its_lease_never_changes_what_the_new_owner_checkpointed(tmp_path, stores, late):
    artifacts, traces = stores
    settings = PipelineSettings.offline(tmp_path)
    settings = settings.model_copy(update={"traces": settings.traces.model_copy(update={"keep": True})})
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    gid = "fenced-" + late.replace("_", "-")
    store.create(gid, "alice", REQUEST, offline=True)

    a_store = Partitioned(store)
    a_images = StaleImages(OfflineImages(settings.images))
    a_artifacts = SlowWrites(artifacts, hold=late == "in_flight_when_the_loss_is_seen")
    if a_artifacts.hold:
        a_images.go.set()  # A's images come at once; its write of them is what stalls
    a_services = Services(chat=OfflineChat(), images=a_images, scoring=PixelScoring(), artifacts=a_artifacts,
                          traces=traces)
    b_services = Services(chat=OfflineChat(), images=OfflineImages(settings.images), scoring=PixelScoring(),
                          artifacts=artifacts, traces=traces)
    lost = threading.Event()
    watcher = _Watch(lost, gid)
    logging.getLogger("sceneref.service").addHandler(watcher)
    try:
        lease_a = store.claim("runner-a", LEASE_S)
        runner_a = asyncio.ensure_future(execute_job(a_store, lease_a, a_services, settings, lease_s=LEASE_S))
        if a_artifacts.hold:
            await until(a_artifacts.writing.is_set, "A's write of a scene-2 image to start")
        else:
            await until(a_images.waiting.is_set, "A to stall in scene 2")
        assert [s.scene_number for s in store.scenes(gid)] == [1]  # A checkpointed scene 1, then stalled
        a_store.cut.set()

        # A's lease runs out; B takes the job over and completes it.
        lease_b = None

        def claimed() -> bool:
            nonlocal lease_b
            lease_b = lease_b or store.claim("runner-b", 30)
            return lease_b is not None

        await until(claimed, "A's lease to expire so that B can claim the job")
        assert await execute_job(store, lease_b, b_services, settings, lease_s=30) is not None
        assert store.get(gid).status == "completed"
        before = snapshot(store, artifacts, traces, gid)
        assert len(before[0]) == 3

        # A goes on, alive and late.
        if a_artifacts.hold:
            a_store.healed.set()  # A's keeper now sees the loss and cancels the run mid-write
            await until(lost.is_set, "A's keeper to notice the lost lease")
            assert not runner_a.done()  # the run waits for its write in flight ...
            a_artifacts.land.set()  # ... which lands after the loss was seen
        else:
            a_images.go.set()
        assert await asyncio.wait_for(runner_a, WAIT_S) is None  # A ends without a word in the store
        late_keys = [k for k in a_artifacts.landed if "/scene_1/" not in k]
        assert late_keys, "A wrote nothing late: the test did not exercise a late write"

        after = snapshot(store, artifacts, traces, gid)
        assert after[0] == before[0]  # the checkpoints
        assert after[1] == before[1]  # the bytes of every image they name
        assert after[2] == before[2]  # every trace file, byte for byte, and no new one
        assert all(artifacts.get(k) != before[1].get(k) for k in late_keys)  # A's bytes went elsewhere
        assert store.get(gid).status == "completed"
    finally:
        logging.getLogger("sceneref.service").removeHandler(watcher)
        a_store.healed.set()
        a_artifacts.land.set()
        a_images.go.set()
        store.close()


class _Watch(logging.Handler):
    """Sets `event` when runner A's lease keeper reports the lease lost (its only outward sign)."""

    def __init__(self, event: threading.Event, gid: str):
        super().__init__(logging.WARNING)
        self.event, self.said = event, f"generation {gid}: lease on {gid} (token 1) was lost"

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.said:  # the keeper's words; runner A holds token 1
            self.event.set()
