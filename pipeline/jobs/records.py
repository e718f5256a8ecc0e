"""What the job store hands out: a job's row, its stored events, a page of them, a user's list
entry; and `event_row`, an event as the store takes it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.schemas import GenerationRequest, ScenePlan, Status


class JobNotFound(KeyError):
    pass

class JobRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    generation_id: str
    owner: str
    status: Status
    progress: int
    stage: str
    request: dict[str, Any]
    storyboard: list[ScenePlan] | None = None
    error: str | None = None
    offline: bool = False
    created_at: datetime
    updated_at: datetime
    reference_key: str | None = None
    lease_holder: str | None = None
    lease_expires_at: datetime | None = None
    lease_token: int = 0
    cancel_requested: bool = False
    finished_at: datetime | None = None
    traces_removed_at: datetime | None = None

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.request)


class EventRecord(BaseModel):
    """One stored progress event."""

    model_config = ConfigDict(frozen=True)

    seq: int
    at: datetime
    kind: str
    stage: str
    progress: int
    scene: int | None = None
    message: str = ""
    data: dict[str, Any] = {}


@dataclass(frozen=True)
class EventPage:
    """Events after a point, and the job's status read *before* them: when that status is
    final, the final status event is among the events or earlier (it is committed with it)."""

    status: Status
    events: list[EventRecord]


class GenerationSummary(BaseModel):
    """One line of a user's list of generations."""

    model_config = ConfigDict(frozen=True)

    generation_id: str
    status: Status
    stage: str
    progress: int
    prompt: str
    created_at: datetime
    finished_at: datetime | None = None
    scene_count: int | None = None  # planned scenes; None before the storyboard exists
    scenes_completed: int = 0
    error: str | None = None
    offline: bool = False


def event_row(
    kind: str, stage: str, progress: int, message: str = "", *, scene: int | None = None,
    data: dict | None = None, at: datetime | None = None,
) -> dict[str, Any]:
    """An event as `append_events` takes it."""
    return {
        "kind": kind, "stage": stage, "progress": int(progress), "message": message, "scene": scene,
        "data": data or {}, "at": at or datetime.now(timezone.utc),
    }
