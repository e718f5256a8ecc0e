"""Job store, on a SQLite file and on a real PostgreSQL (every test runs on both): ownership,
updates, scene checkpoints, resume, status shape, leases and fencing, cancellation, admission
counts and retention."""

from __future__ import annotations

import threading

import pytest

from datetime import datetime, timedelta, timezone

from pipeline.jobs.records import JobNotFound
from pipeline.jobs.store import JobStore
from pipeline.jobs.leases import Lease, LeaseLost
from pipeline.schemas import GenerationRequest, GenerationStatus, SceneResult, ScenePlan
from pipeline.jobs.status import to_status

REQUEST = GenerationRequest(
    prompt="A lighthouse keeper climbs the stairs at dawn",
    target_duration=15,
    advanced_image_num_variations=3,
    advanced_image_max_enhancement_iterations=2,
    advanced_image_quality_threshold=0,
).model_dump(mode="json")

PLAN = [
    ScenePlan(scene_number=1, duration=5, prompt="keeper wakes"),
    ScenePlan(scene_number=2, duration=5, prompt="keeper climbs"),
    ScenePlan(scene_number=3, duration=5, prompt="lamp lit at dawn"),
]


def scene(number: int, score: float | None = 70.0, **extra) -> SceneResult:
    return SceneResult(
        scene_number=number,
        duration=5,
        original_prompt=PLAN[number - 1].prompt,
        enhanced_prompt=f"cinematic shot {number}",
        prompt_score=88.0,
        reference_image_key=f"gen-1/scene_{number}/variation_1.png",
        quality_score=score,
        **extra,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_db")
    return f"sqlite:///{tmp_path}/nested/dir/sceneref.db"


@pytest.fixture
def store(url):
    store = JobStore(url)
    yield store
    store.close()


def test_create_get_and_owner_scoping(store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    record = store.get("gen-1", owner="alice")
    assert record is not None
    assert (record.status, record.progress, record.stage, record.offline) == ("queued", 0, "queued", True)
    assert record.request == REQUEST
    assert record.storyboard is None and record.error is None
    assert record.created_at.tzinfo is not None
    assert record.generation_request().advanced_image_quality_threshold == 0
    assert store.get("gen-1", owner="mallory") is None
    assert store.get("gen-1") is not None
    assert store.get("missing") is None


def test_owner_ids_of_any_length_a_token_allows(store):
    """A JWT `sub` has no length limit: 300 characters overflowed the old VARCHAR(255) on
    PostgreSQL, and 20,000 random characters are more than a btree index entry may hold."""
    import secrets

    since = datetime.now(timezone.utc) - timedelta(minutes=1)
    for n, owner in enumerate(["o" * 300, secrets.token_hex(10_000)]):
        gid = f"gen-long-{n}"
        store.create(gid, owner, REQUEST, offline=False)
        assert store.get(gid, owner=owner).owner == owner
        assert store.get(gid, owner=owner[:-1] + "x") is None
        assert store.count_active(owner) == 1 and store.count_submitted_since(owner, since) == 1
        assert store.request_cancel(gid, owner) and store.cancel_requested(gid)


def test_duplicate_id_is_refused(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    with pytest.raises(Exception):
        store.create("gen-1", "bob", REQUEST, offline=False)
    assert store.get("gen-1", owner="alice") is not None


def test_update_fields_and_validation(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    before = store.get("gen-1").updated_at
    store.update("gen-1", status="running", progress=40, stage="variations", storyboard=PLAN)
    record = store.get("gen-1")
    assert (record.status, record.progress, record.stage) == ("running", 40, "variations")
    assert record.storyboard == PLAN
    assert record.updated_at >= before
    store.update("gen-1", status="failed", error="scorer pickscore failed: CUDA OOM")
    record = store.get("gen-1")
    assert record.status == "failed" and record.progress == 40 and record.error.startswith("scorer")
    with pytest.raises(ValueError):
        store.update("gen-1", progress=101)
    with pytest.raises(ValueError):
        store.update("gen-1", status="done")  # type: ignore[arg-type]
    with pytest.raises(JobNotFound):
        store.update("missing", progress=1)


def test_checkpoint_upsert_and_order(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    store.checkpoint_scene("gen-1", scene(3))
    store.checkpoint_scene("gen-1", scene(1, score=10))
    store.checkpoint_scene("gen-1", scene(1, score=55, below_threshold=False))
    results = store.scenes("gen-1")
    assert [s.scene_number for s in results] == [1, 3]
    assert results[0].quality_score == 55
    assert store.scenes("other") == []
    with pytest.raises(JobNotFound):
        store.checkpoint_scene("missing", scene(1))


def test_unfinished(store):
    for index, owner in enumerate(["alice", "bob", "alice", "alice"]):
        store.create(f"gen-{index}", owner, REQUEST, offline=False)
    store.update("gen-0", status="completed", progress=100)
    store.update("gen-1", status="running")
    store.update("gen-3", status="failed", error="boom")
    assert [r.generation_id for r in store.unfinished()] == ["gen-1", "gen-2"]


def test_second_instance_sees_data(url, store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    store.update("gen-1", status="running", progress=30, storyboard=PLAN)
    store.checkpoint_scene("gen-1", scene(1))
    store.close()
    restarted = JobStore(url)
    try:
        assert [r.generation_id for r in restarted.unfinished()] == ["gen-1"]
        assert restarted.get("gen-1", owner="alice").storyboard == PLAN
        [resumed] = restarted.scenes("gen-1")
        assert resumed.model_dump(exclude={"completed_at"}) == scene(1).model_dump(exclude={"completed_at"})
    finally:
        restarted.close()


def test_concurrent_writers(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for step in range(20):
                store.update("gen-1", progress=step, stage=f"worker-{worker}")
                store.checkpoint_scene("gen-1", scene(1 + worker % 3))
                store.get("gen-1", owner="alice")
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [s.scene_number for s in store.scenes("gen-1")] == [1, 2, 3]


def test_in_memory_url_shares_one_database():
    store = JobStore("sqlite://")
    store.create("gen-1", "alice", REQUEST, offline=True)
    assert store.get("gen-1", owner="alice") is not None
    store.close()


def test_to_status_shape(store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    record = store.get("gen-1")
    empty = to_status(record, [], url_for=lambda key: f"/artifacts/{key}")
    assert empty.storyboard_plan.scenes == [] and empty.status == "queued"

    store.update("gen-1", status="running", progress=50, storyboard=PLAN)
    store.checkpoint_scene("gen-1", scene(1, score=None, user_provided=True))
    store.checkpoint_scene("gen-1", scene(2, score=25, below_threshold=True))
    status = to_status(store.get("gen-1"), store.scenes("gen-1"), url_for=lambda key: f"/artifacts/{key}?sig=x")
    assert isinstance(status, GenerationStatus)
    body = status.model_dump(mode="json")
    assert body["generation_id"] == "gen-1"
    assert body["status"] == "running" and body["progress"] == 50
    assert body["advanced_image_generation_used"] is True
    assert body["offline"] is True and body["error"] is None
    assert body["storyboard_plan"]["advanced_image_settings"] == {
        "quality_threshold": 0.0,
        "num_variations": 3,
        "max_enhancement_iterations": 2,
    }
    first, second, third = body["storyboard_plan"]["scenes"]
    assert first == {
        "scene_number": 1,
        "duration": 5,
        "prompt": "keeper wakes",
        "status": "completed",
        "enhanced_prompt": "cinematic shot 1",
        "reference_image_url": "/artifacts/gen-1/scene_1/variation_1.png?sig=x",
        "quality_score": None,
        "prompt_score": 88.0,
        "below_threshold": False,
        "user_provided": True,
    }
    assert second["below_threshold"] is True and second["quality_score"] == 25
    assert third == {"scene_number": 3, "duration": 5, "prompt": "lamp lit at dawn", "status": "pending"}


# --- leases, fencing, cancellation, admission, retention ---------------------------------

EXPIRED = -1.0  # a lease that is already over: the next claimer takes the job without waiting


def test_claim_takes_oldest_unheld_job_once(store):
    for index in range(3):
        store.create(f"gen-{index}", "alice", REQUEST, offline=False)
    store.update("gen-0", status="completed")
    first = store.claim("runner-a", 30)
    assert (first.generation_id, first.holder, first.token) == ("gen-1", "runner-a", 1)
    assert first.expires_at > datetime.now(timezone.utc) + timedelta(seconds=25)
    record = store.get("gen-1")
    assert (record.status, record.lease_holder, record.lease_token) == ("running", "runner-a", 1)
    second = store.claim("runner-b", 30)
    assert second.generation_id == "gen-2"
    assert store.claim("runner-c", 30) is None
    assert store.claim("runner-c", 30, generation_id="gen-1") is None  # live lease
    assert store.claim("runner-c", 30, generation_id="missing") is None


def test_expired_lease_is_taken_over_and_old_holder_is_fenced(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    old = store.claim("runner-a", EXPIRED)
    store.checkpoint_scene("gen-1", scene(1), old)
    new = store.claim("runner-b", 30)
    assert (new.generation_id, new.token) == ("gen-1", 2)
    with pytest.raises(LeaseLost):
        store.update("gen-1", progress=50, stage="late", lease=old)
    with pytest.raises(LeaseLost):
        store.checkpoint_scene("gen-1", scene(2), old)
    with pytest.raises(LeaseLost):
        store.renew(old, 30)
    with pytest.raises(LeaseLost):
        store.finish(old, "failed", error="late")
    record = store.get("gen-1")
    assert (record.status, record.progress, record.stage, record.lease_holder) == ("running", 0, "queued", "runner-b")
    assert [s.scene_number for s in store.scenes("gen-1")] == [1]
    store.update("gen-1", progress=60, lease=new)
    assert store.renew(new, 60).expires_at > new.expires_at
    assert store.checkpoint_scene("gen-1", scene(2), new) is True
    assert store.get("gen-1").progress == 60
    with pytest.raises(LeaseLost):
        store.update("gen-1", progress=1, lease=Lease("gen-1", "runner-b", 1, new.expires_at))
    with pytest.raises(JobNotFound):
        store.renew(Lease("missing", "x", 1, new.expires_at), 30)


def test_a_checkpointed_scene_keeps_its_first_image(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    lease = store.claim("runner-a", 30)
    assert store.checkpoint_scene("gen-1", scene(1), lease) is True
    other = scene(1).model_copy(update={"reference_image_key": "gen-1/scene_1/variation_9.png"})
    assert store.checkpoint_scene("gen-1", other, lease) is False
    assert store.checkpoint_scene("gen-1", other) is False
    [kept] = store.scenes("gen-1")
    assert kept.reference_image_key == "gen-1/scene_1/variation_1.png"


def test_finish_and_release(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    store.create("gen-2", "alice", REQUEST, offline=False)
    lease = store.claim("runner-a", 30, generation_id="gen-1")
    with pytest.raises(ValueError):
        store.finish(lease, "running")  # type: ignore[arg-type]
    store.finish(lease, "completed")
    record = store.get("gen-1")
    assert (record.status, record.stage, record.progress, record.lease_holder) == ("completed", "completed", 100, None)
    assert record.finished_at is not None and record.lease_expires_at is None
    with pytest.raises(LeaseLost):  # the final status ended the lease
        store.update("gen-1", progress=5, lease=lease)
    held = store.claim("runner-a", 30)
    store.release(held)
    assert store.get("gen-2").status == "running" and store.get("gen-2").lease_holder is None
    again = store.claim("runner-b", 30)
    assert (again.generation_id, again.token) == ("gen-2", 2)


def test_cancel_queued_running_and_abandoned_jobs(store):
    for name in ("queued", "running", "abandoned", "done"):
        store.create(name, "alice", REQUEST, offline=False)
    running = store.claim("runner-a", 30, generation_id="running")
    store.claim("runner-dead", EXPIRED, generation_id="abandoned")
    done = store.claim("runner-a", 30, generation_id="done")
    store.finish(done, "completed")

    assert store.request_cancel("queued", "mallory") is False
    assert store.request_cancel("missing", "alice") is False
    assert store.request_cancel("queued", "alice") is True
    assert store.get("queued").status == "cancelled" and store.get("queued").finished_at is not None
    assert store.request_cancel("abandoned", "alice") is True
    assert store.get("abandoned").status == "cancelled"
    assert store.request_cancel("done", "alice") is True
    assert store.get("done").status == "completed" and not store.cancel_requested("done")

    assert store.request_cancel("running", "alice") is True
    assert store.get("running").status == "running" and store.cancel_requested("running")
    assert store.claim("runner-b", 30) is None  # cancelled jobs are not handed out
    store.finish(running, "cancelled")
    assert store.get("running").status == "cancelled"


def test_cancel_requested_job_whose_runner_died_ends_at_next_claim(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    store.claim("runner-dead", 30)
    store.request_cancel("gen-1", "alice")
    assert store.get("gen-1").status == "running"  # its runner may still be alive
    with store.engine.begin() as conn:  # the runner dies: its lease runs out
        from pipeline.jobs.tables import jobs_table

        conn.execute(jobs_table.update().values(lease_expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert store.claim("runner-b", 30) is None
    assert store.get("gen-1").status == "cancelled"


def test_requeue_failed_and_cancelled_jobs(store):
    store.create("gen-1", "alice", REQUEST, offline=False)
    lease = store.claim("runner-a", 30)
    store.checkpoint_scene("gen-1", scene(1), lease)
    store.finish(lease, "failed", error="image API 503")
    assert store.get("gen-1").error == "image API 503"
    assert store.requeue("gen-1", "mallory") is False
    assert store.requeue("gen-1", "alice") is True
    record = store.get("gen-1")
    assert (record.status, record.error, record.finished_at, record.cancel_requested) == ("queued", None, None, False)
    assert [s.scene_number for s in store.scenes("gen-1")] == [1]  # resumes at scene 2
    again = store.claim("runner-b", 30)
    assert again.token == 2
    assert store.requeue("gen-1", "alice") is False  # running: nothing to requeue
    store.request_cancel("gen-1", "alice")
    store.finish(again, "cancelled")
    assert store.requeue("gen-1", "alice") is True
    assert store.claim("runner-c", 30).generation_id == "gen-1"


def test_admission_counts(store):
    for index, owner in enumerate(["alice", "alice", "alice", "bob"]):
        store.create(f"gen-{index}", owner, REQUEST, offline=False)
    lease = store.claim("runner-a", 30, generation_id="gen-0")
    store.finish(lease, "completed")
    store.claim("runner-a", 30, generation_id="gen-1")
    assert store.count_active("alice") == 2
    assert store.count_active("bob") == 1 and store.count_active("carol") == 0
    assert store.count_unfinished() == 3
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    assert store.count_submitted_since("alice", hour_ago) == 3
    assert store.count_submitted_since("alice", datetime.now(timezone.utc) + timedelta(seconds=5)) == 0


def test_expired_and_delete(store):
    for index in range(4):
        store.create(f"gen-{index}", "alice", REQUEST, offline=False)
    for index, status in enumerate(["completed", "failed", "cancelled"]):
        lease = store.claim("runner-a", 30, generation_id=f"gen-{index}")
        store.checkpoint_scene(f"gen-{index}", scene(1), lease)
        store.finish(lease, status)  # type: ignore[arg-type]
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert store.expired(finished_before=later, limit=10) == ["gen-0", "gen-1", "gen-2"]
    assert store.expired(finished_before=later, limit=2) == ["gen-0", "gen-1"]
    assert store.expired(finished_before=datetime.now(timezone.utc) - timedelta(hours=1), limit=10) == []
    assert store.delete("gen-0") is True and store.delete("gen-0") is False
    assert store.get("gen-0") is None and store.scenes("gen-0") == []
    assert store.get("gen-3") is not None  # unfinished jobs never expire


def test_reference_key_is_stored(store):
    store.create("gen-1", "alice", REQUEST, offline=False, reference_key="gen-1/scene_1/user_reference.png")
    assert store.get("gen-1").reference_key == "gen-1/scene_1/user_reference.png"
    store.create("gen-2", "alice", REQUEST, offline=False)
    assert store.get("gen-2").reference_key is None


def test_cancel_requests_of_many_jobs_in_one_query(store):
    for generation_id in ("a", "b", "c"):
        store.create(generation_id, "alice", REQUEST, offline=True)
    leases = [store.claim("runner", 30, generation_id=g) for g in ("a", "b", "c")]
    assert all(leases)
    assert store.cancel_requested_among(["a", "b", "c"]) == set()
    assert store.request_cancel("b", "alice")
    assert store.cancel_requested_among(["a", "b", "c"]) == {"b"}
    assert store.cancel_requested_among([]) == set()
