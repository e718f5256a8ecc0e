"""Retention: a finished generation's images, traces and row go together after the period;
unfinished and recent ones stay; a second sweep (another replica) finds nothing to do."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import IntegrityError

from pipeline.storage.objectstore import LocalObjectStore
from pipeline.storage.factory import open_store
from pipeline.jobs.store import JobStore
from pipeline.jobs.retention import RetentionSettings, sweep, sweep_orphans
from pipeline.schemas import GenerationRequest

REQUEST = GenerationRequest(prompt="A lighthouse keeper's morning", target_duration=9).model_dump(mode="json")


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path):
    """Local directories, or S3 prefixes on the session's SeaweedFS server."""
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    if request.param == "local":
        yield store, LocalObjectStore(tmp_path / "artifacts"), LocalObjectStore(tmp_path / "traces")
    else:
        where = request.getfixturevalue("s3_location")
        yield store, open_store(f"{where.url}/artifacts", where.settings), open_store(f"{where.url}/traces", where.settings)
    store.close()


def make(store, artifacts, traces, generation_id: str, finish: str | None) -> None:
    store.create(generation_id, "alice", REQUEST, offline=True)
    artifacts.put(f"{generation_id}/scene_1/variation_1.png", b"png-bytes")
    traces.put(f"{generation_id}/scene_1/00_original_prompt.txt", b"prompt\n")
    if finish:
        lease = store.claim("tester", 30, generation_id=generation_id)
        store.finish(lease, finish)


def test_sweep_removes_only_expired_finished_generations(stores):
    store, artifacts, traces = stores
    for generation_id, finish in [("done", "completed"), ("broken", "failed"), ("stopped", "cancelled"), ("queued", None)]:
        make(store, artifacts, traces, generation_id, finish)
    settings = RetentionSettings(traces_s=3600, generations_s=3600)

    assert sweep(store, artifacts, traces, settings) == []  # nothing is old enough yet
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    removed = sweep(store, artifacts, traces, settings, now=later)
    assert sorted(removed) == ["broken", "done", "stopped"]
    for generation_id in removed:
        assert store.get(generation_id) is None
        assert artifacts.list(f"{generation_id}/") == [] and traces.list(f"{generation_id}/") == []
    assert store.get("queued") is not None  # unfinished work is never expired
    assert artifacts.exists("queued/scene_1/variation_1.png")
    assert sweep(store, artifacts, traces, settings, now=later) == []  # idempotent


def test_traces_go_before_images_and_rows(stores):
    store, artifacts, traces = stores
    make(store, artifacts, traces, "failed-job", "failed")
    settings = RetentionSettings(traces_s=3600, generations_s=7200)
    in_between = datetime.now(timezone.utc) + timedelta(seconds=5400)
    assert sweep(store, artifacts, traces, settings, now=in_between) == []
    assert traces.list("failed-job/") == []  # the failed job's traces are gone ...
    assert artifacts.exists("failed-job/scene_1/variation_1.png")  # ... its images and row stay
    record = store.get("failed-job")
    assert record is not None and record.traces_removed_at is not None
    assert store.traces_expired(finished_before=in_between, limit=10) == []  # removed once
    later = datetime.now(timezone.utc) + timedelta(seconds=7300)
    assert sweep(store, artifacts, traces, settings, now=later) == ["failed-job"]
    assert store.get("failed-job") is None and artifacts.list("failed-job/") == []


def test_traces_may_not_outlive_images():
    with pytest.raises(ValueError, match="traces_s"):
        RetentionSettings(traces_s=10, generations_s=5)


def test_sweep_works_in_batches(stores):
    store, artifacts, traces = stores
    for i in range(7):
        make(store, artifacts, traces, f"gen-{i}", "completed")
    later = datetime.now(timezone.utc) + timedelta(days=40)
    removed = sweep(store, artifacts, traces, RetentionSettings(batch=3), now=later)
    assert len(removed) == 7 and store.count_unfinished() == 0


# --- orphans: objects whose generation has no job row -------------------------------------------


def test_an_upload_whose_row_was_never_created_is_swept_after_the_grace_period(stores):
    """The ingress stores a user's image before it creates the job's row; when creating the row
    fails (or the replica dies in between) the objects have no row. Retention still finds them."""
    store, artifacts, traces = stores
    orphan, living = uuid.uuid4().hex, uuid.uuid4().hex
    artifacts.put(f"{orphan}/scene_1/user_reference.png", b"png-bytes")
    artifacts.put(f"{orphan}/upload/original.jpeg", b"jpeg-bytes")
    store.create(orphan, "alice", REQUEST, offline=True)
    with pytest.raises(IntegrityError):  # creating the row fails (here: the id is taken)
        store.create(orphan, "bob", REQUEST, offline=True)
    store.delete(orphan)  # (and the row that took the id is gone: no row names the objects)
    traces.put(f"{orphan}/scene_2/attempt_abc/quality_scores.json", b"{}")  # a runner's late write
    make(store, artifacts, traces, living, None)  # a queued job: its objects are reachable
    settings = RetentionSettings(orphans_grace_s=3600)

    assert sweep(store, artifacts, traces, settings) == []
    assert artifacts.exists(f"{orphan}/scene_1/user_reference.png")  # within the grace period: kept
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    sweep(store, artifacts, traces, settings, now=later)
    assert artifacts.list(f"{orphan}/") == [] and traces.list(f"{orphan}/") == []
    assert artifacts.exists(f"{living}/scene_1/variation_1.png") and traces.list(f"{living}/")
    assert store.get(living) is not None


def test_the_orphan_sweep_waits_for_the_newest_object_of_a_generation(stores):
    """A submission in flight (upload stored, row not yet created) is never swept."""
    store, artifacts, traces = stores
    orphan = uuid.uuid4().hex
    artifacts.put(f"{orphan}/upload/original.jpeg", b"jpeg-bytes")
    artifacts.put(f"{orphan}/scene_1/user_reference.png", b"png-bytes")
    written = datetime.now(timezone.utc)
    assert sweep(store, artifacts, traces, RetentionSettings(orphans_grace_s=3600)) == []
    assert sweep_orphans(store, artifacts, written - timedelta(minutes=5)) == []
    assert artifacts.exists(f"{orphan}/scene_1/user_reference.png")
    assert sweep_orphans(store, artifacts, written + timedelta(minutes=5)) == [orphan]
    assert artifacts.list(f"{orphan}/") == []


def test_the_orphan_sweep_touches_only_names_the_service_mints(stores):
    """Anything else in the store (a nested store, an operator's folder) is never taken for an
    orphaned generation."""
    store, artifacts, traces = stores
    artifacts.put("reference_image_traces/gen/scene_1/00_original_prompt.txt", b"prompt\n")
    artifacts.put("notes/readme.txt", b"mine")
    later = datetime.now(timezone.utc) + timedelta(days=400)
    assert sweep_orphans(store, artifacts, later) == []
    assert artifacts.exists("notes/readme.txt") and artifacts.exists("reference_image_traces/gen/scene_1/00_original_prompt.txt")
