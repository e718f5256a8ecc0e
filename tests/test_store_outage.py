"""Job-store outages against a real PostgreSQL server stopped and restarted inside the test
(pipeline/jobs/run.py): an outage shorter than the documented bound loses nothing and needs no
user action, a longer one ends the job resumable (never an internal error), a final status that
cannot land leaves the job to lease takeover, and events lost on the way are announced by a
`gap` event, never dropped silently.

Each test stops the server at a known point of the run (the storyboard's `planned` event, after
the storyboard is stored), so the next checkpoint meets the outage."""

from __future__ import annotations

import asyncio
import subprocess
from types import SimpleNamespace

import pytest

from pipeline.jobs.tables import FINAL_EVENT
from pipeline.jobs.store import JobStore
from pipeline.jobs.run import GAP_EVENT, execute_job, run_claimed
from tests.test_job_lifecycle import REQUEST, locked, services, settings  # noqa: F401 (fixture)
from tests.test_job_lifecycle import store as sqlite_store  # noqa: F401 (fixture)


@pytest.fixture
def pg(postgres_outage_cluster):
    """The module's own cluster, running, and a fresh database on it."""
    cluster = postgres_outage_cluster
    try:
        cluster.start_server()  # a previous test that failed mid-outage left it stopped
    except subprocess.CalledProcessError:
        pass  # already running
    name = f"outage_{id(object())}"
    cluster.admin(f'CREATE DATABASE "{name}"')
    store = JobStore(cluster.url(name))
    yield cluster, store
    store.close()
    try:
        cluster.start_server()
    except subprocess.CalledProcessError:
        pass
    cluster.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stop_at_planned(cluster, seen: list):
    """on_event: record every event; stop the server when the storyboard is stored (blocking,
    so nothing of the run goes on before the server is gone)."""

    def on_event(event):
        seen.append(event)
        if event.kind == "planned" and not any(e.kind == "planned" for e in seen[:-1]):
            cluster.stop_server()

    return on_event


async def restart_after(cluster, stopped: list, outage_s: float) -> None:
    """Start the server `outage_s` after the run stopped it."""
    while not any(e.kind == "planned" for e in stopped):
        await asyncio.sleep(0.05)
    await asyncio.sleep(outage_s)
    await asyncio.to_thread(cluster.start_server)


def runner_events(store: JobStore, generation_id: str):
    """The log's events the runner emitted (not the submission's, the final status's or gaps),
    and the events lost by the gaps the log announces."""
    events = store.events_after(generation_id, None, 0, 10_000).events
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    lost = sum(e.data["lost"] for e in events if e.kind == GAP_EVENT)
    return [e for e in events if e.kind not in ("queued", FINAL_EVENT, GAP_EVENT)], lost


async def test_an_outage_shorter_than_the_bound_loses_nothing(pg, settings):
    """Six seconds down (longer than the old checkpoint retries, shorter than the lease): the run
    waits at its next checkpoint and goes on by itself; every scene and every event lands."""
    cluster, store = pg
    store.create("gen-1", "alice", REQUEST, offline=True)
    seen: list = []
    restart = asyncio.ensure_future(restart_after(cluster, seen, 6.0))
    scenes = await execute_job(
        store, store.claim("runner-a", 30), services(settings), settings, lease_s=30, store_outage_s=60,
        on_event=stop_at_planned(cluster, seen),
    )
    await restart
    record = store.get("gen-1")
    assert (record.status, record.error) == ("completed", None)
    assert scenes is not None and [s.scene_number for s in store.scenes("gen-1")] == [1, 2, 3]
    logged, lost = runner_events(store, "gen-1")
    assert lost == 0 and [e.kind for e in logged] == [e.kind for e in seen]


async def test_an_outage_longer_than_the_bound_ends_the_job_resumable(pg, settings, monkeypatch):
    """Down past the bound: the run gives up as a transient failure the user can resume (not an
    internal error), its final status lands when the server is back (here: once the run has
    begun trying to write it), and the events that could not be written are announced by a gap
    event."""
    cluster, store = pg
    store.create("gen-1", "alice", REQUEST, offline=True)
    seen: list = []
    finishing = asyncio.Event()
    real_finish = store.finish

    def finish(*args, **kwargs):
        finishing.set()  # from the worker thread: the loop reads it below, after the run
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish", finish)

    async def restart_when_finishing():
        while not finishing.is_set():
            await asyncio.sleep(0.05)
        await asyncio.to_thread(cluster.start_server)

    restart = asyncio.ensure_future(restart_when_finishing())
    scenes = await execute_job(
        store, store.claim("runner-a", 30), services(settings), settings, lease_s=30, store_outage_s=4,
        on_event=stop_at_planned(cluster, seen),
    )
    await restart
    assert scenes is None
    record = store.get("gen-1")
    assert record.status == "failed" and "internal error" not in record.error
    assert "job store" in record.error and "resumed" in record.error
    logged, lost = runner_events(store, "gen-1")
    assert len(logged) + lost == len(seen)  # each event is in the log or counted by a gap
    assert store.requeue("gen-1", "alice")
    assert await run_claimed(store, "runner-b", services(settings), settings, lease_s=30) is True
    assert store.get("gen-1").status == "completed"


async def test_a_final_status_that_cannot_land_leaves_the_job_to_lease_takeover(pg, settings):
    """Down for longer than the run's wait and its final write's together: execute_job returns
    (it raises nothing for nobody to see), the job stays `running` under a lease nobody renews,
    and once that lease expires another runner takes the job over and completes it."""
    cluster, store = pg
    store.create("gen-1", "alice", REQUEST, offline=True)
    seen: list = []
    restart = asyncio.ensure_future(restart_after(cluster, seen, 6.0))
    result = await execute_job(
        store, store.claim("runner-a", 3), services(settings), settings, lease_s=3, store_outage_s=1.5,
        on_event=stop_at_planned(cluster, seen),
    )
    assert result is None
    await restart
    record = store.get("gen-1")
    assert record.status == "running" and record.lease_holder == "runner-a"
    for _ in range(150):  # until runner-a's lease expires (3 s after its last renewal); 30 s at most
        if await run_claimed(store, "runner-b", services(settings), settings, lease_s=30):
            break
        await asyncio.sleep(0.2)
    record = store.get("gen-1")
    assert (record.status, record.lease_token) == ("completed", 2)


async def test_events_the_store_could_not_take_are_announced_by_a_gap(sqlite_store, settings, monkeypatch):
    """SQLite, locked for the event writer's first four writes (longer than its bound): the
    events of those writes are dropped, and the log says so with a gap event counting them, in
    their place; every other event and the job itself are unaffected."""
    store = sqlite_store
    store.create("gen-1", "alice", REQUEST, offline=True)
    real, calls = store.append_events, []

    def locked_at_first(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 4:
            raise locked()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "append_events", locked_at_first)
    monkeypatch.setattr("pipeline.jobs.run._EventWriter.RETRY_S", 0.01)
    seen: list = []
    scenes = await execute_job(
        store, store.claim("runner-a", 30), services(settings), settings, store_outage_s=0.05, on_event=seen.append,
    )
    assert scenes is not None and store.get("gen-1").status == "completed"
    events = store.events_after("gen-1", None, 0, 10_000).events
    gaps = [e for e in events if e.kind == GAP_EVENT]
    assert len(gaps) == 1 and gaps[0].data["lost"] > 0 and "missing" in gaps[0].message
    logged, lost = runner_events(store, "gen-1")
    assert len(logged) + lost == len(seen)
    # The gap stands where the lost events were: what follows it is the rest, in order.
    after_gap = [e.kind for e in events[events.index(gaps[0]) + 1:] if e.kind != FINAL_EVENT]
    assert after_gap == [e.kind for e in seen][lost:]


def test_the_outage_bound_is_at_least_the_lease():
    """A bound shorter than the lease would fail jobs on a store restart that the lease keeps
    safe: refused, naming both settings."""
    from pydantic import ValidationError

    from deployments.args import JobSettings

    assert JobSettings().store_outage_s >= JobSettings().lease_s
    with pytest.raises(ValidationError, match=r"jobs.store_outage_s \(20\) must be at least jobs.lease_s \(30\)"):
        JobSettings(lease_s=30, store_outage_s=20)


# --- readiness -----------------------------------------------------------------------------


async def test_readiness_reports_a_job_store_that_cannot_be_reached(pg, tmp_path):
    """GET /api/ready's store check (deployments/readiness.py) with the server stopped: not
    ready, naming the job store; ready again once it is back."""
    from deployments.readiness import StoreCheck, ping_object_store
    from pipeline.storage.objectstore import LocalObjectStore

    cluster, store = pg
    check = StoreCheck(
        {"job store": store.ping, "object store": lambda: ping_object_store(LocalObjectStore(tmp_path / "artifacts"))},
        cache_s=0,
    )
    assert (await check.check()).ok
    cluster.stop_server()
    health = await check.check()
    assert not health.ok and [name for name, _ in health.unreachable] == ["job store"]
    assert health.reason().startswith("the job store cannot be reached (OperationalError")
    cluster.start_server()
    assert (await check.check()).ok


async def test_the_ready_route_answers_503_while_the_job_store_is_down(pg, tmp_path, monkeypatch):
    """The `ready` route of the ingress, built bare (no Serve): 503 with Retry-After naming the
    job store while the server is stopped, although every deployment has a live replica."""
    from fastapi import HTTPException

    from deployments.ingress import Ingress
    from deployments.readiness import StoreCheck

    class Bare(Ingress.func_or_class):
        def __del__(self):  # the replica's shutdown hook: no worker to stop here
            pass

    cluster, store = pg
    ingress = object.__new__(Bare)  # the route needs only the two checks
    ingress.readiness = SimpleNamespace(check=_ready, required=["ImageGenerator"])
    ingress.store_check = StoreCheck({"job store": store.ping}, cache_s=0)
    assert (await ingress.ready())["status"] == "ready"
    cluster.stop_server()
    with pytest.raises(HTTPException) as refused:
        await ingress.ready()
    assert refused.value.status_code == 503 and refused.value.headers["Retry-After"]
    assert "job store cannot be reached" in refused.value.detail


async def _ready():
    from deployments.readiness import Readiness

    return Readiness(())


# --- the event stream ----------------------------------------------------------------------


async def test_the_event_stream_waits_out_a_job_store_outage(pg):
    """An SSE stream open while the server stops: it says so in a comment line instead of
    breaking, and once the server is back it sends the events written meanwhile, in order."""
    from pipeline.jobs import events as sse
    from pipeline.jobs.records import event_row

    cluster, store = pg
    store.create("gen-1", "alice", REQUEST, offline=True)

    async def read(after_seq):
        return await asyncio.to_thread(store.events_after, "gen-1", "alice", after_seq, sse.PAGE)

    stream = sse.event_stream(read, 0, poll_s=0.05, keepalive_s=60, max_s=60)
    assert (await anext(stream)).startswith("retry:")
    assert "event: queued" in await anext(stream)
    cluster.stop_server()
    frame = await asyncio.wait_for(anext(stream), 30)
    assert frame == ": the job store cannot be reached; waiting for it\n\n"
    cluster.start_server()
    store.append_events("gen-1", [event_row("planning", "planning", 0, "planning the storyboard")])
    for _ in range(600):  # comment lines until the store answers again (30 s at most)
        frame = await asyncio.wait_for(anext(stream), 30)
        if not frame.startswith(":"):
            break
    assert frame.startswith("id: 2\nevent: planning\n")
    await stream.aclose()
