"""Process entry point for the admission race tests (spawned processes import it by name).

`submit` is the one admission path the ingress takes, so the race tests exercise exactly what
an HTTP submission does."""

from __future__ import annotations

import threading

from pipeline.jobs.store import JobStore
from pipeline.jobs.limits import AdmissionLimits, AdmissionRefused

REQUEST = {"prompt": "A lighthouse keeper's morning", "target_duration": 9}


def submit(store: JobStore, generation_id: str, owner: str, limits: AdmissionLimits) -> tuple[str, int | None, str]:
    """("accepted", None, "") or ("refused", status code, reason + Retry-After)."""
    try:
        store.create(generation_id, owner, REQUEST, offline=True, limits=limits)
    except AdmissionRefused as exc:
        refusal = exc.refusal
        return ("refused", refusal.status_code, f"{refusal.reason}|{refusal.retry_after_s}")
    return ("accepted", None, "")


def race(url: str, name: str, jobs: list[tuple[str, str]], limits: dict, barrier, results) -> None:
    """Submit `jobs` ((generation id, owner) pairs), one thread each, all released together with
    the other processes; puts [(generation id, outcome, code, detail)]."""
    store = JobStore(url)
    outcomes: list[tuple[str, str, int | None, str]] = []
    admission = AdmissionLimits.model_validate(limits)
    start = threading.Barrier(len(jobs) + 1, timeout=120)

    def one(generation_id: str, owner: str) -> None:
        start.wait()
        try:
            outcomes.append((generation_id, *submit(store, generation_id, owner, admission)))
        except Exception as exc:  # reported, so the test names it instead of hanging
            outcomes.append((generation_id, "error", None, repr(exc)))

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()  # every process's store is open and warm
        start.wait()
        for thread in threads:
            thread.join()
    finally:
        store.close()
        results.put((name, outcomes))
