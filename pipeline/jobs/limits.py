"""Admission control: every generation costs real money at the providers, so what one user can
start is bounded, and so is the queue the whole service accepts. A refusal says when to try
again (HTTP `Retry-After`) instead of letting work pile up where nobody can see it.

The counts come from the shared job store, so the limits hold across every ingress replica, and
they hold under races too: `JobStore.create(..., limits=...)` counts and inserts in one
transaction that admissions take one at a time (PostgreSQL: a transaction-scoped advisory lock;
SQLite: `BEGIN IMMEDIATE`, its one writer), so submissions racing on any number of replicas and
threads cannot pass one over a limit. `check_admission` on the store alone is only an early
answer (the ingress asks it before storing an upload); the insert decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict, Field


class AdmissionLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_active_per_user: int = Field(4, ge=1, description="queued + running generations of one user")
    max_submitted_per_window: int = Field(30, ge=1, description="generations one user may submit per window")
    window_s: float = Field(3600.0, gt=0, description="the sliding window of max_submitted_per_window")
    max_unfinished: int = Field(200, ge=1, description="queued + running generations of all users together")
    retry_after_s: int = Field(30, ge=1, description="Retry-After for a full queue or too many active jobs")


@dataclass(frozen=True)
class Refusal:
    """Why a submission is refused: `status_code` 429 (this user's limit) or 503 (the service's)."""

    status_code: int
    reason: str
    retry_after_s: int


class AdmissionRefused(Exception):
    """Raised by `JobStore.create` when the admission check inside its transaction refuses."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.reason)
        self.refusal = refusal


def check_admission(
    store, owner: str, limits: AdmissionLimits, now: datetime | None = None, *, resume: bool = False
) -> Refusal | None:
    """None when `owner` may submit one more generation now. `store` is anything with the four
    counts below: the job store (a snapshot, racy) or the admission transaction's own view.
    `resume`: the generation was already submitted (and counted in the window); it only needs
    room among the active ones. Synchronous (database reads): async callers run it in a worker
    thread."""
    now = now or datetime.now(timezone.utc)
    active = store.count_active(owner)
    if active >= limits.max_active_per_user:
        return Refusal(
            429,
            f"you have {active} generations queued or running (limit {limits.max_active_per_user}); "
            "wait for one to finish or cancel one (DELETE /api/generations/{id})",
            limits.retry_after_s,
        )
    since = now - timedelta(seconds=limits.window_s)
    submitted = 0 if resume else store.count_submitted_since(owner, since)
    if submitted >= limits.max_submitted_per_window:
        return Refusal(
            429,
            f"you submitted {submitted} generations in the last {limits.window_s:g} s "
            f"(limit {limits.max_submitted_per_window})",
            _window_retry(store, owner, since, limits),
        )
    unfinished = store.count_unfinished()
    if unfinished >= limits.max_unfinished:
        return Refusal(
            503,
            f"the service has {unfinished} generations queued or running (limit {limits.max_unfinished}); try again later",
            limits.retry_after_s,
        )
    return None


def _window_retry(store, owner: str, since: datetime, limits: AdmissionLimits) -> int:
    """Seconds until the oldest submission in the window leaves it (at least 1)."""
    first = store.oldest_submitted_since(owner, since)
    if first is None:
        return limits.retry_after_s
    return max(1, int((first - since).total_seconds()) + 1)
