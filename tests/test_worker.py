"""The job worker (pipeline/jobs/worker.py) on a real SQLite job store, without Serve: it claims
up to its limit, wakes on a submission, stops the runs whose owner cancelled them elsewhere,
observes a run that raises, and stops its runs on shutdown. The runs are stand-ins that wait
for the test to let them end: what is tested is the worker, not the generation
(tests/test_job_lifecycle.py runs the real one)."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from sqlalchemy.exc import OperationalError

from pipeline.jobs.leases import Lease
from pipeline.jobs.store import JobStore
from pipeline.jobs.worker import JobSettings, JobWorker
from pipeline.schemas import GenerationRequest

REQUEST = GenerationRequest(prompt="Fresh juice for a sunny afternoon picnic", target_duration=15).model_dump(mode="json")
BOUND_S = 20.0  # every wait of these tests is bounded: a worker that never acts fails, never hangs


class Runs:
    """Stands in for execute_job: each run waits until the test ends it; counts how many run at once."""

    def __init__(self):
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.running = self.peak = 0
        self.changed = asyncio.Event()

    async def __call__(self, store, lease, services, settings, **options):
        gid = lease.generation_id
        self.release[gid] = asyncio.Event()
        self.started.append(gid)
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.changed.set()
        try:
            await self.release[gid].wait()
            store.finish(lease, "completed")
        finally:
            self.running -= 1
            self.changed.set()

    async def until(self, condition, what: str) -> None:
        async def wait() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(wait(), BOUND_S)
        except asyncio.TimeoutError:
            pytest.fail(f"not within {BOUND_S:g} s: {what}")


@pytest.fixture
def store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    yield store
    store.close()


@pytest.fixture
def runs(monkeypatch) -> Runs:
    runs = Runs()
    monkeypatch.setattr("pipeline.jobs.worker.execute_job", runs)
    return runs


def worker_for(store: JobStore, **jobs) -> JobWorker:
    return JobWorker(store, services=None, settings=None, jobs=JobSettings(**jobs), holder="worker-test",
                     cancel_watch_s=0.05)


async def test_claims_up_to_its_limit_and_the_next_job_when_one_ends(store, runs):
    for gid in ("gen-1", "gen-2", "gen-3"):
        store.create(gid, "alice", REQUEST, offline=True)
    worker = worker_for(store, max_running_per_replica=2, poll_s=3600)  # only a run's end wakes it
    worker.start()
    try:
        await runs.until(lambda: runs.running == 2, "two jobs running")
        assert worker.running == 2 and store.get(runs.started[0]).lease_holder == "worker-test"
        assert [r.status for r in map(store.get, ("gen-1", "gen-2", "gen-3"))].count("queued") == 1
        runs.release[runs.started[0]].set()  # one ends: its place goes to the queued one
        await runs.until(lambda: len(runs.started) == 3, "the third job claimed once a place was free")
        for gid in runs.started[1:]:
            runs.release[gid].set()
        await runs.until(lambda: runs.running == 0, "every run ended")
        assert runs.peak == 2  # never more than its limit at once
        assert {store.get(gid).status for gid in runs.started} == {"completed"}
    finally:
        await worker.stop()


async def test_a_submission_wakes_it_before_its_next_poll(store, runs):
    claims = asyncio.Event()

    class Observed(JobStore):
        def claim(self, *args, **kwargs):
            lease = super().claim(*args, **kwargs)
            if lease is None:
                claims.set()  # a claim round found nothing: the worker now sleeps
            return lease

    observed = Observed(store.url)
    worker = worker_for(observed, poll_s=3600)  # its next poll is an hour away
    worker.start()
    try:
        await asyncio.wait_for(claims.wait(), BOUND_S)
        observed.create("gen-1", "alice", REQUEST, offline=True)
        worker.wake()
        await runs.until(lambda: runs.started == ["gen-1"], "the submitted job claimed on wake")
        runs.release["gen-1"].set()
    finally:
        await worker.stop()
        observed.close()


async def test_a_cancel_asked_on_another_replica_stops_the_run_here(store, runs):
    store.create("gen-1", "alice", REQUEST, offline=True)
    worker = worker_for(store, poll_s=3600)
    worker.start()
    try:
        await runs.until(lambda: runs.running == 1, "the job running")
        task = worker.tasks["gen-1"]
        store.request_cancel("gen-1", "alice")  # as another replica's DELETE does
        await asyncio.wait([task], timeout=BOUND_S)
        assert task.cancelled() and worker.running == 0
    finally:
        await worker.stop()


async def test_stop_cancels_the_loops_and_the_running_jobs(store, runs):
    store.create("gen-1", "alice", REQUEST, offline=True)
    worker = worker_for(store, poll_s=3600)
    worker.start()
    await runs.until(lambda: runs.running == 1, "the job running")
    task = worker.tasks["gen-1"]
    await worker.stop()
    assert task.cancelled() and runs.running == 0
    assert all(loop.done() for loop in worker.loops)


async def test_a_run_that_raises_is_logged_not_left_unretrieved(store, monkeypatch, caplog):
    """Every task the worker starts is observed: a run that raises is logged, never left for
    asyncio to report as "Task exception was never retrieved" when the task is collected; the
    final-status hook is still called for it."""
    async def crashing_run(*args, **kwargs):
        raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr("pipeline.jobs.worker.execute_job", crashing_run)
    finished: list[str] = []

    async def on_finished(generation_id: str) -> None:
        finished.append(generation_id)

    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        worker = JobWorker(store, None, None, JobSettings(), holder="worker-test", on_finished=on_finished)
        with caplog.at_level(logging.ERROR, logger="sceneref.worker"):
            task = worker._start(Lease("gen-1", "worker-test", 1, None))
            assert worker.tasks == {"gen-1": task}
            await asyncio.wait([task])
            for _ in range(20):  # the done callback, then its follow-up task (the final-status hook)
                await asyncio.sleep(0.01)
        del task
        gc.collect()  # an unretrieved exception is reported when its task is collected
        assert worker.tasks == {} and worker._wake.is_set()
        assert finished == ["gen-1"] and not worker.background
        assert not unretrieved, [c.get("message") for c in unretrieved]
        assert "generation gen-1: its run raised" in caplog.text and "OperationalError" in caplog.text
    finally:
        loop.set_exception_handler(previous)
