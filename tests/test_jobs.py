"""Job store, on a SQLite file and on a real PostgreSQL (every test runs on both): ownership,
updates, scene checkpoints, resume, status shape, leases and fencing, cancellation, admission
counts and retention."""

from __future__ import annotations

import threading

import pytest

from pipeline.jobs import JobNotFound, JobStore, to_status
from pipeline.schemas import GenerationRequest, GenerationStatus, SceneResult, ScenePlan

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
