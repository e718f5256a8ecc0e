"""Admission control against the real job store: per-user limits answer 429 with a useful
Retry-After, a full service answers 503, and nothing else is refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.jobs.store import JobStore
from pipeline.jobs.limits import AdmissionLimits, check_admission
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


# --- admission under races: processes (ingress replicas) and threads (their worker pools)
# submitting at once.

PROCESSES, THREADS = 2, 10  # two ingress replicas, ten of their worker threads each


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_db")
    return f"sqlite:///{tmp_path}/jobs.db"


def race(url: str, owners: list[str], limits: AdmissionLimits, prefix: str = "gen") -> list[tuple[str, str, int | None, str]]:
    """PROCESSES x THREADS submissions at once, the n-th by owners[n % len(owners)]."""
    import multiprocessing

    from tests.admission_workers import race as worker

    JobStore(url).close()  # migrated once, before the race
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(PROCESSES + 1), context.Queue()
    workers = []
    for p in range(PROCESSES):
        jobs = [(f"{prefix}-{p}-{t}", owners[(p * THREADS + t) % len(owners)]) for t in range(THREADS)]
        workers.append(context.Process(target=worker, args=(url, f"replica-{p}", jobs, limits.model_dump(), barrier, queue)))
    for process in workers:
        process.start()
    barrier.wait(timeout=180)
    outcomes = [outcome for _ in workers for outcome in queue.get(timeout=180)[1]]
    for process in workers:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert [o for o in outcomes if o[1] == "error"] == []
    return outcomes


def test_racing_submissions_of_one_user_start_at_most_the_active_limit(url):
    limits = AdmissionLimits(max_active_per_user=4, max_submitted_per_window=100, max_unfinished=100, retry_after_s=9)
    outcomes = race(url, ["alice"], limits)
    accepted = [o for o in outcomes if o[1] == "accepted"]
    refused = [o for o in outcomes if o[1] == "refused"]
    store = JobStore(url)
    try:
        print(f"\nadmission race [{url.split(':')[0]}]: {len(accepted)} of {len(outcomes)} accepted, limit 4")
        assert len(accepted) == 4 and len(refused) == PROCESSES * THREADS - 4
        assert store.count_active("alice") == 4
        assert sorted(store.get(o[0]).generation_id for o in accepted) == sorted(o[0] for o in accepted)
        for _, _, code, detail in refused:  # the refusal keeps its code, reason and Retry-After
            assert code == 429 and "generations queued or running (limit 4)" in detail and detail.endswith("|9")
        for _, _, _, detail in refused:
            assert "you have 4 generations" in detail  # counted inside the serialised transaction
    finally:
        store.close()


def test_racing_submissions_hold_the_window_and_the_global_queue(url):
    # One user against the window; then many users against the service's queue.
    window = AdmissionLimits(max_active_per_user=100, max_submitted_per_window=3, window_s=600, max_unfinished=100)
    outcomes = race(url, ["bob"], window)
    assert len([o for o in outcomes if o[1] == "accepted"]) == 3
    assert {(o[2], "3 generations in the last 600 s" in o[3]) for o in outcomes if o[1] == "refused"} == {(429, True)}

    queue = AdmissionLimits(max_active_per_user=100, max_submitted_per_window=100, max_unfinished=3 + 5, retry_after_s=13)
    outcomes = race(url, [f"user-{n}" for n in range(PROCESSES * THREADS)], queue, prefix="queue")
    assert len([o for o in outcomes if o[1] == "accepted"]) == 5  # bob's three fill the rest
    assert {(o[2], o[3].endswith("|13")) for o in outcomes if o[1] == "refused"} == {(503, True)}


@pytest.mark.parametrize("where", ["memory", "file"])
def test_create_with_limits_refuses_with_the_refusal(tmp_path, where):
    """The admission inside `create` answers as `check_admission` does, in-memory SQLite (one
    shared connection) included, and a refused submission leaves no row and no event."""
    from pipeline.jobs.limits import AdmissionRefused

    store = JobStore("sqlite://" if where == "memory" else f"sqlite:///{tmp_path}/jobs.db")
    limits = AdmissionLimits(max_active_per_user=2, max_submitted_per_window=100, max_unfinished=100, retry_after_s=5)
    try:
        store.create("a-1", "alice", REQUEST, offline=True, limits=limits)
        store.create("a-2", "alice", REQUEST, offline=True, limits=limits)
        with pytest.raises(AdmissionRefused) as refused:
            store.create("a-3", "alice", REQUEST, offline=True, limits=limits)
        assert refused.value.refusal == check_admission(store, "alice", limits)
        assert refused.value.refusal.status_code == 429 and refused.value.refusal.retry_after_s == 5
        assert store.get("a-3") is None and store.events_after("a-3", None) is None
        store.create("b-1", "bob", REQUEST, offline=True, limits=limits)  # and the store still writes
        assert store.count_active("bob") == 1
    finally:
        store.close()


def test_racing_resumes_of_one_user_start_at_most_the_active_limit(url):
    """Ten cancelled generations resumed at once from ten threads (separate connections on
    PostgreSQL): the resume's admission is the same serialised transaction as a submission's."""
    import threading

    from pipeline.jobs.limits import AdmissionRefused

    limits = AdmissionLimits(max_active_per_user=3, max_submitted_per_window=10, max_unfinished=100)
    store = JobStore(url)
    try:
        ids = submit(store, "alice", 10)
        for generation_id in ids:
            store.request_cancel(generation_id, "alice")
        assert store.count_active("alice") == 0
        start, outcomes = threading.Barrier(len(ids), timeout=60), []

        def resume(generation_id: str) -> None:
            start.wait()
            try:
                outcomes.append(store.requeue(generation_id, "alice", limits=limits))
            except AdmissionRefused as exc:
                outcomes.append(exc.refusal.status_code)

        threads = [threading.Thread(target=resume, args=(g,)) for g in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes, key=str) == [429] * 7 + [True] * 3  # the window (10 of 10) does not refuse a resume
        assert store.count_active("alice") == 3
        assert store.requeue("nobody-has-this", "alice", limits=limits) is False  # not resumable: False, not a refusal
    finally:
        store.close()


def test_an_admission_waits_a_bounded_time_for_a_stuck_lock_holder(postgres_db):
    """A stuck admission (its holder paused mid-transaction) does not hang every later one: the
    wait for the admission lock is bounded and ends in the store's temporary error, which the
    API answers 503 with Retry-After, and admissions go on once the holder is gone."""
    import threading

    import psycopg
    from sqlalchemy.exc import OperationalError

    from pipeline.jobs.store import _ADMISSION_LOCK

    limits = AdmissionLimits()
    store = JobStore(postgres_db, admission_wait_s=0.5)
    holder = psycopg.connect(postgres_db.replace("postgresql+psycopg://", "postgresql://"))
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_ADMISSION_LOCK,))  # held until its transaction ends
        outcome: list = []

        def admit() -> None:
            try:
                store.create("stuck-1", "alice", REQUEST, offline=True, limits=limits)
                outcome.append("created")
            except Exception as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=admit, daemon=True)
        waiter.start()
        waiter.join(timeout=60)  # far above the 0.5 s wait: only an unbounded wait gets here alive
        assert not waiter.is_alive(), "the admission is still waiting for the lock"
        assert len(outcome) == 1 and isinstance(outcome[0], OperationalError), outcome
        assert "lock timeout" in str(outcome[0])
        assert store.get("stuck-1") is None
        holder.rollback()  # the holder goes away
        store.create("stuck-1", "alice", REQUEST, offline=True, limits=limits)
        assert store.get("stuck-1").status == "queued"
    finally:
        holder.close()
        store.close()
