"""Retention: nothing a generation stores lives forever. A finished generation (completed,
failed or cancelled) keeps its images, trace files and job row for `generations_s`; then all
three are removed together, so a status never points at deleted images.

Every step is idempotent (deleting a missing prefix or row is a no-op), so several ingress
replicas may run the sweep at the same time on the same stores.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("sceneref.retention")


class RetentionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generations_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="how long a finished generation's images, traces and row are kept"
    )
    interval_s: float = Field(3600.0, gt=0, description="how often each ingress replica sweeps")
    batch: int = Field(100, ge=1, description="generations removed per sweep step")


def sweep(store, artifacts, traces, settings: RetentionSettings, now: datetime | None = None) -> list[str]:
    """Remove every generation that finished more than `generations_s` ago; return their ids.
    Objects first, the row last: a sweep interrupted half-way is finished by the next one."""
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(seconds=settings.generations_s)
    removed: list[str] = []
    while True:
        ids = store.expired(finished_before=cutoff, limit=settings.batch)
        if not ids:
            return removed
        for generation_id in ids:
            artifacts.delete_prefix(f"{generation_id}/")
            if traces is not None:
                traces.delete_prefix(f"{generation_id}/")
            store.delete(generation_id)
            removed.append(generation_id)
        log.info("retention removed %d generations finished before %s", len(ids), cutoff.isoformat())
        if len(ids) < settings.batch:
            return removed
