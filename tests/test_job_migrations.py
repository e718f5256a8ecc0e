"""Job store schema under Alembic, on SQLite and PostgreSQL: a fresh database migrates to
exactly the code's tables; a database made by the old `metadata.create_all` (no
alembic_version) is stamped 0001 and upgraded in place, its rows kept; several processes
opening one new database at once all succeed."""

from __future__ import annotations

import multiprocessing
import secrets
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON, Boolean, CheckConstraint, Column, DateTime, ForeignKey, Integer, MetaData, String, Table, Text,
    create_engine, insert, inspect,
)

from pipeline.jobs import migrations
from pipeline.jobs.store import JobStore
from pipeline.jobs.tables import metadata
from tests.job_workers import open_store

# The tables exactly as pipeline/jobs.py declared them before migrations (git 19b5182).
old = MetaData()
Table(
    "jobs", old,
    Column("generation_id", String(64), primary_key=True),
    Column("owner", String(255), nullable=False, index=True),
    Column("status", String(16), nullable=False, index=True),
    Column("progress", Integer, nullable=False, default=0),
    Column("stage", String(64), nullable=False, default="queued"),
    Column("request", JSON, nullable=False),
    Column("storyboard", JSON(none_as_null=True), nullable=True),
    Column("error", Text, nullable=True),
    Column("offline", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("status IN ('queued', 'running', 'completed', 'failed')", name="ck_jobs_status"),
    CheckConstraint("progress >= 0 AND progress <= 100", name="ck_jobs_progress"),
)
Table(
    "scenes", old,
    Column("generation_id", String(64), ForeignKey("jobs.generation_id", ondelete="CASCADE"), primary_key=True),
    Column("scene_number", Integer, primary_key=True),
    Column("result", JSON, nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=False),
)

SCENE = {
    "scene_number": 1, "duration": 5, "original_prompt": "keeper wakes", "enhanced_prompt": "shot 1",
    "prompt_score": 88.0, "reference_image_key": "old-1/scene_1/variation_1.png", "quality_score": 70.0,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_db")
    return f"sqlite:///{tmp_path}/jobs.db"


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


def test_fresh_database_migrates_to_the_code_schema(url):
    JobStore(url).close()
    engine = create_engine(url)
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head() == "0005"
        assert set(inspect(conn).get_table_names()) == {"jobs", "scenes", "events", "alembic_version"}
    engine.dispose()
    assert _diff(url) == []


def test_old_create_all_database_is_stamped_and_upgraded_in_place(url):
    engine = create_engine(url)
    old.create_all(engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        for gid, status in (("old-1", "completed"), ("old-2", "running")):
            conn.execute(insert(old.tables["jobs"]).values(
                generation_id=gid, owner="alice", status=status, progress=100 if status == "completed" else 40,
                stage=status, request={"prompt": "x"}, storyboard=None, error=None, offline=False,
                created_at=now, updated_at=now,
            ))
        conn.execute(insert(old.tables["scenes"]).values(
            generation_id="old-1", scene_number=1, result=SCENE, completed_at=now
        ))
    engine.dispose()

    store = JobStore(url)
    try:
        done, running = store.get("old-1"), store.get("old-2")
        assert (done.status, done.progress, done.lease_token, done.cancel_requested) == ("completed", 100, 0, False)
        assert done.finished_at is not None  # backfilled, so retention can expire it
        assert running.finished_at is None and running.reference_key is None
        assert [s.reference_image_key for s in store.scenes("old-1")] == [SCENE["reference_image_key"]]
        lease = store.claim("runner", 30)  # the old running job is resumable
        assert (lease.generation_id, lease.token) == ("old-2", 1)
        store.finish(lease, "cancelled")  # the new status passes the new CHECK constraint
    finally:
        store.close()
    assert _diff(url) == []


def test_many_processes_open_a_new_database_at_once(url):
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.map(open_store, [url] * 4)
    assert results == ["0005"] * 4
    assert _diff(url) == []


def test_0003_database_upgrades_in_place_to_owner_ids_of_any_length(url):
    """0004 widens `owner` from VARCHAR(255) to TEXT (with an index PostgreSQL accepts for any
    length) on a live database: its jobs and scenes stay, and a long owner then fits."""
    from alembic import command
    from sqlalchemy import MetaData as Reflected

    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = migrations.config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    tables = Reflected()
    tables.reflect(engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(insert(tables.tables["jobs"]).values(
            generation_id="old-1", owner="alice", status="completed", progress=100, stage="completed",
            request={"prompt": "x"}, storyboard=None, error=None, offline=False, created_at=now, updated_at=now,
            lease_token=3, cancel_requested=False, finished_at=now,
        ))
        conn.execute(insert(tables.tables["scenes"]).values(
            generation_id="old-1", scene_number=1, result=SCENE, completed_at=now
        ))
    engine.dispose()

    store = JobStore(url)
    try:
        record = store.get("old-1", owner="alice")
        assert (record.status, record.progress, record.lease_token) == ("completed", 100, 3)
        assert [s.reference_image_key for s in store.scenes("old-1")] == [SCENE["reference_image_key"]]
        owner = "sub-" + secrets.token_hex(6000)  # random: no compression shrinks it under a btree limit
        store.create("new-1", owner, {"prompt": "y"}, offline=False)
        assert store.get("new-1", owner=owner).owner == owner and store.count_active(owner) == 1
    finally:
        store.close()
    engine = create_engine(url)
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        assert "owner" in {c for index in inspect(conn).get_indexes("jobs") for c in index["column_names"]}
    engine.dispose()
    assert _diff(url) == []


def test_0004_database_gets_the_event_log(url):
    """0005 adds `events` beside live jobs: an old job reads an empty log, then logs as usual."""
    from alembic import command
    from sqlalchemy import MetaData as Reflected

    from pipeline.jobs.records import event_row

    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = migrations.config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    tables = Reflected()
    tables.reflect(engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(insert(tables.tables["jobs"]).values(
            generation_id="old-1", owner="alice", status="running", progress=40, stage="generating",
            request={"prompt": "x"}, storyboard=None, error=None, offline=False, created_at=now, updated_at=now,
            lease_token=0, cancel_requested=False,
        ))
    engine.dispose()
    store = JobStore(url)
    try:
        assert store.events_after("old-1", "alice").events == []
        assert store.append_events("old-1", [event_row("planning", "planning", 40)]) == [1]
        assert [g.generation_id for g in store.generations("alice")] == ["old-1"]
    finally:
        store.close()
    assert _diff(url) == []
