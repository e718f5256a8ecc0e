"""Admission control against the real job store: per-user limits answer 429 with a useful
Retry-After, a full service answers 503, and nothing else is refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.jobs import JobStore
from pipeline.limits import AdmissionLimits, check_admission
from pipeline.schemas import GenerationRequest

REQUEST = GenerationRequest(prompt="A lighthouse keeper's morning", target_duration=9).model_dump(mode="json")


@pytest.fixture
def store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    yield store
    store.close()


def submit(store: JobStore, owner: str, n: int, prefix: str = "") -> list[str]:
    ids = [f"{prefix or owner}-{i}" for i in range(n)]
    for generation_id in ids:
        store.create(generation_id, owner, REQUEST, offline=True)
    return ids


def finish_all(store: JobStore) -> None:
    while (lease := store.claim("tester", 30)) is not None:
        store.finish(lease, "completed")


def test_active_jobs_per_user(store):
    limits = AdmissionLimits(max_active_per_user=2, max_submitted_per_window=100, max_unfinished=100, retry_after_s=7)
    assert check_admission(store, "alice", limits) is None
    submit(store, "alice", 2)
    refusal = check_admission(store, "alice", limits)
    assert refusal is not None and refusal.status_code == 429 and refusal.retry_after_s == 7
    assert "2 generations queued or running" in refusal.reason
    assert check_admission(store, "bob", limits) is None  # other users are not affected
    finish_all(store)
    assert check_admission(store, "alice", limits) is None


def test_submissions_per_window_then_the_window_slides(store):
    limits = AdmissionLimits(max_active_per_user=100, max_submitted_per_window=3, window_s=600, max_unfinished=100)
    submit(store, "alice", 3)
    finish_all(store)  # finished jobs still count against the window
    refusal = check_admission(store, "alice", limits)
    assert refusal is not None and refusal.status_code == 429
    assert "3 generations in the last 600 s" in refusal.reason
    assert 1 <= refusal.retry_after_s <= 601
    later = datetime.now(timezone.utc) + timedelta(seconds=601)
    assert check_admission(store, "alice", limits, now=later) is None


def test_a_full_service_answers_503(store):
    limits = AdmissionLimits(max_active_per_user=10, max_submitted_per_window=100, max_unfinished=5, retry_after_s=11)
    for owner in ("a", "b", "c", "d", "e"):
        submit(store, owner, 1)
    refusal = check_admission(store, "newcomer", limits)
    assert refusal is not None and refusal.status_code == 503 and refusal.retry_after_s == 11
    finish_all(store)
    assert check_admission(store, "newcomer", limits) is None
