"""Retention: nothing a generation stores lives forever. A finished generation (completed,
failed or cancelled) keeps its trace files for `traces_s` (failed jobs' traces included: with
`traces.keep: false` a *completed* job's traces go at completion already), and its images and
job row for `generations_s`; those two go together, so a status never points at deleted images.

Nothing stored is out of retention's reach: objects whose generation has no job row (an upload
stored before its row, when creating the row failed or the replica died in between; a runner
that wrote late after its job was removed) are swept too, once every object under the
generation's prefix is older than `orphans_grace_s`. The grace period is what keeps a
submission in flight (upload stored, row not yet created) safe.

Every step is idempotent (deleting a missing prefix or row is a no-op), so several ingress
replicas may run the sweep at the same time on the same stores.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("sceneref.retention")


class RetentionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    traces_s: float = Field(7 * 24 * 3600.0, gt=0, description="how long a finished generation's trace files are kept")
    generations_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="how long a finished generation's images and job row are kept"
    )
    interval_s: float = Field(3600.0, gt=0, description="how often each ingress replica sweeps")
    batch: int = Field(100, ge=1, description="generations removed per sweep step")
    orphans_grace_s: float = Field(
        3600.0, gt=0,
        description="objects of a generation with no job row are removed once all are older than this",
    )

    @model_validator(mode="after")
    def _traces_go_first(self) -> "RetentionSettings":
        # Trace images may be pointers to the artifacts (docs/storage.md): they must not outlive them.
        if self.traces_s > self.generations_s:
            raise ValueError("retention.traces_s must not be longer than retention.generations_s")
        return self


def sweep(store, artifacts, traces, settings: RetentionSettings, now: datetime | None = None) -> list[str]:
    """Remove the trace files of generations that finished more than `traces_s` ago, then
    every generation that finished more than `generations_s` ago; return the latter's ids.
    Objects first, the row (or its mark) last: a sweep interrupted half-way is finished by the
    next one."""
    now = now or datetime.now(timezone.utc)
    if traces is not None:
        _sweep_traces(store, traces, now - timedelta(seconds=settings.traces_s), settings.batch)
    for objects in (artifacts, traces):
        if objects is not None:
            sweep_orphans(store, objects, now - timedelta(seconds=settings.orphans_grace_s), settings.batch)
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


def _sweep_traces(store, traces, cutoff: datetime, batch: int) -> None:
    while True:
        ids = store.traces_expired(finished_before=cutoff, limit=batch)
        for generation_id in ids:
            traces.delete_prefix(f"{generation_id}/")
            store.mark_traces_removed(generation_id)
        if ids:
            log.info("retention removed the traces of %d generations finished before %s", len(ids), cutoff.isoformat())
        if len(ids) < batch:
            return


# The ids the service and the CLI mint (uuid4().hex). Only top-level names of this shape are
# ever taken for a generation, so anything else sharing the store (another store nested in it,
# an operator's file) is never swept as an orphan.
GENERATION_ID = re.compile(r"[0-9a-f]{32}")


def sweep_orphans(store, objects, older_than: datetime, batch: int = 100) -> list[str]:
    """Remove the objects of generations that have no job row, once all of them were last
    written before `older_than`; return those generations' ids."""
    names = [name for name in objects.folders() if GENERATION_ID.fullmatch(name)]
    removed = []
    for start in range(0, len(names), batch):
        chunk = names[start : start + batch]
        for generation_id in sorted(set(chunk) - store.known(chunk)):
            newest = objects.newest(generation_id)
            if newest is not None and newest >= older_than:
                continue  # a submission in flight, or a late write: not an orphan yet
            objects.delete_prefix(generation_id)
            removed.append(generation_id)
    if removed:
        log.info("retention removed the objects of %d generations with no job row from %s", len(removed), objects.url)
    return removed
