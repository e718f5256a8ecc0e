"""The job store's tables: one row per generation (`jobs`), one per finished scene (`scenes`) and
its progress events (`events`). The schema is managed by Alembic (`pipeline/jobs/migrations`),
whose environment reads this metadata; the queries are in `store.py`, the leases in `leases.py`."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

STATUSES: tuple[str, ...] = ("queued", "running", "completed", "failed", "cancelled")
UNFINISHED: tuple[str, ...] = ("queued", "running")
FINISHED: tuple[str, ...] = ("completed", "failed", "cancelled")

metadata = MetaData()

jobs_table = Table(
    "jobs",
    metadata,
    Column("generation_id", String(64), primary_key=True),
    # The token's `sub`, which a JWT does not bound: TEXT, indexed by hash on PostgreSQL, whose
    # btree entries may not exceed about 2.7 kB (every owner query is an equality). Migration 0004.
    Column("owner", Text, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("progress", Integer, nullable=False, default=0),
    Column("stage", String(64), nullable=False, default="queued"),
    Column("request", JSON, nullable=False),
    Column("storyboard", JSON(none_as_null=True), nullable=True),
    Column("error", Text, nullable=True),
    Column("offline", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("reference_key", String(1024), nullable=True),
    Column("lease_holder", String(255), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("lease_token", Integer, nullable=False, default=0, server_default="0"),
    Column("cancel_requested", Boolean, nullable=False, default=False, server_default=false()),
    Column("finished_at", DateTime(timezone=True), nullable=True, index=True),
    Column("traces_removed_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(
        "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')", name="ck_jobs_status"
    ),
    CheckConstraint("progress >= 0 AND progress <= 100", name="ck_jobs_progress"),
    Index("ix_jobs_owner", "owner", postgresql_using="hash"),
)

scenes_table = Table(
    "scenes",
    metadata,
    Column(
        "generation_id",
        String(64),
        ForeignKey("jobs.generation_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("scene_number", Integer, primary_key=True),
    Column("result", JSON, nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=False),
)


# A generation's progress events in order (migration 0005). `kind` says what happened (planning,
# iteration, variation, scored, selected, status, ...), `stage` is the job's stage at the time.
events_table = Table(
    "events",
    metadata,
    Column(
        "generation_id",
        String(64),
        ForeignKey("jobs.generation_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("stage", String(64), nullable=False),
    Column("progress", Integer, nullable=False),
    Column("scene", Integer, nullable=True),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=False),
)
# The kind of the event that closes a run: written with the final status (completed, failed,
# cancelled), in the same transaction.
FINAL_EVENT = "status"
