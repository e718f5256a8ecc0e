"""The job store's event log (live progress), on SQLite and PostgreSQL: events numbered in order
from 1, fenced by the lease, read after a seq by their owner only, closed by the final status
event in the same transaction as the final status, removed with the generation; and the list
of a user's generations, newest first, page by page."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.jobs.tables import FINAL_EVENT, jobs_table
from pipeline.jobs.store import JobStore
from pipeline.jobs.leases import LeaseLost
from pipeline.jobs.records import event_row
from pipeline.jobs.retention import RetentionSettings, sweep
from pipeline.schemas import ScenePlan, SceneResult
from tests.test_jobs import REQUEST


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = request.getfixturevalue("postgres_db") if request.param == "postgresql" else f"sqlite:///{tmp_path}/e.db"
    store = JobStore(url)
    yield store
    store.close()


def kinds(page) -> list[str]:
    return [e.kind for e in page.events]


def test_events_are_numbered_in_order_and_read_after_a_seq(store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    lease = store.claim("runner", 30)
    seqs = store.append_events(
        "gen-1",
        [event_row("planning", "planning", 0, "planning"), event_row("iteration", "enhancing", 7, scene=2,
                                                                     data={"iteration": 1, "overall": 81.5})],
        lease, progress=7, stage="enhancing",
    )
    assert seqs == [2, 3]  # seq 1 is the "queued" event of create
    assert store.append_events("gen-1", [event_row("variation", "generating", 30, scene=1)], lease) == [4]
    page = store.events_after("gen-1", "alice")
    assert [e.seq for e in page.events] == [1, 2, 3, 4]
    assert kinds(page) == ["queued", "planning", "iteration", "variation"] and page.status == "running"
    third = page.events[2]
    assert (third.scene, third.data, third.progress, third.stage) == (2, {"iteration": 1, "overall": 81.5}, 7, "enhancing")
    assert third.at.tzinfo is not None
    record = store.get("gen-1")
    assert (record.progress, record.stage) == (7, "enhancing")  # the same transaction moved the job
    assert [e.seq for e in store.events_after("gen-1", "alice", after_seq=2).events] == [3, 4]
    assert [e.seq for e in store.events_after("gen-1", "alice", after_seq=1, limit=2).events] == [2, 3]
    assert store.events_after("gen-1", "alice", after_seq=4).events == []


def test_another_owner_and_unknown_ids_read_nothing(store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    assert store.events_after("gen-1", "mallory") is None
    assert store.events_after("nope", "alice") is None
    assert kinds(store.events_after("gen-1", None)) == ["queued"]  # no owner: the CLI's own reads


def test_a_runner_that_lost_its_lease_appends_nothing(store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    old = store.claim("runner-a", 30)
    with store.engine.begin() as conn:  # its lease lapses (a stalled runner), with no clock involved
        conn.execute(jobs_table.update().values(lease_expires_at=old.expires_at - timedelta(hours=1)))
    new = store.claim("runner-b", 30)
    assert new is not None and new.token == old.token + 1
    with pytest.raises(LeaseLost):
        store.append_events("gen-1", [event_row("variation", "generating", 50)], old, progress=50)
    assert store.append_events("gen-1", [event_row("variation", "generating", 40)], new) == [2]
    assert kinds(store.events_after("gen-1", "alice")) == ["queued", "variation"]
    assert store.get("gen-1").progress == 0


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_the_final_status_writes_the_final_event(store, status):
    store.create("gen-1", "alice", REQUEST, offline=True)
    lease = store.claim("runner", 30)
    store.append_events("gen-1", [event_row("planning", "planning", 5)], lease, progress=5)
    store.finish(lease, status, error="boom" if status == "failed" else None)
    page = store.events_after("gen-1", "alice")
    last = page.events[-1]
    assert page.status == status and last.kind == FINAL_EVENT and last.seq == 3
    assert last.data == {"status": status, "progress": 100 if status == "completed" else 5,
                         "error": "boom" if status == "failed" else None}


def test_cancelled_without_a_runner_and_resumed_jobs_have_their_events(store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    assert store.request_cancel("gen-1", "alice")  # nobody runs it: cancelled at once
    assert kinds(store.events_after("gen-1", "alice"))[-1] == FINAL_EVENT
    assert store.requeue("gen-1", "alice")
    page = store.events_after("gen-1", "alice")
    assert kinds(page) == ["queued", FINAL_EVENT, "queued"] and page.events[-1].data == {"resumed": True}
    assert page.status == "queued"


def test_retention_deletes_the_events_with_the_generation(store, tmp_path):
    from pipeline.storage.objectstore import LocalObjectStore

    store.create("gen-1", "alice", REQUEST, offline=True)
    store.create("gen-2", "alice", REQUEST, offline=True)
    lease = store.claim("runner", 30, generation_id="gen-1")
    store.append_events("gen-1", [event_row("planning", "planning", 5)], lease)
    store.finish(lease, "completed")
    later = datetime.now(timezone.utc) + timedelta(days=400)
    artifacts = LocalObjectStore(tmp_path / "a")
    assert sweep(store, artifacts, None, RetentionSettings(), now=later) == ["gen-1"]
    assert store.events_after("gen-1", None) is None
    with store.engine.connect() as conn:
        from sqlalchemy import func, select
        from pipeline.jobs.tables import events_table

        left = conn.execute(select(events_table.c.generation_id, func.count()).group_by(events_table.c.generation_id)).all()
    assert [tuple(row) for row in left] == [("gen-2", 1)]


def test_a_users_generations_newest_first_page_by_page(store):
    for i in range(5):
        store.create(f"gen-{i}", "alice", {**REQUEST, "prompt": f"prompt number {i}"}, offline=True)
    store.create("gen-bob", "bob", REQUEST, offline=True)
    lease = store.claim("runner", 30, generation_id="gen-3")
    store.update("gen-3", storyboard=[ScenePlan(scene_number=n, duration=5, prompt=f"s{n}") for n in (1, 2, 3)], lease=lease)
    store.checkpoint_scene("gen-3", SceneResult(
        scene_number=1, duration=5, original_prompt="s1", enhanced_prompt="e1", reference_image_key="k1"), lease)
    first = store.generations("alice", limit=2)
    assert [g.generation_id for g in first] == ["gen-4", "gen-3"]
    assert (first[1].scene_count, first[1].scenes_completed, first[1].status) == (3, 1, "running")
    assert (first[0].scene_count, first[0].prompt) == (None, "prompt number 4")
    second = store.generations("alice", limit=2, before=(first[-1].created_at, first[-1].generation_id))
    third = store.generations("alice", limit=2, before=(second[-1].created_at, second[-1].generation_id))
    assert [g.generation_id for g in second + third] == ["gen-2", "gen-1", "gen-0"]
    assert [g.generation_id for g in store.generations("bob")] == ["gen-bob"]
    assert store.generations("nobody") == []
