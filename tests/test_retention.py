"""Retention: a finished generation's images, traces and row go together after the period;
unfinished and recent ones stay; a second sweep (another replica) finds nothing to do."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.artifacts import LocalObjectStore
from pipeline.objectstore import open_store
from pipeline.jobs import JobStore
from pipeline.retention import RetentionSettings, sweep
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
