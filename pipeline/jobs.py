"""Job store: one row per generation and one per finished scene, over any SQLAlchemy URL.

Scenes are checkpointed as soon as they are selected, so a restarted service can resume a
generation at its next scene (`unfinished()`), and the status endpoint reads everything it
shows from here. Only portable column types are used, so PostgreSQL works by URL alone.
Methods are synchronous and thread-safe; async callers run them in a worker thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from pipeline.schemas import (
    AdvancedImageSettings,
    GenerationRequest,
    GenerationStatus,
    SceneResult,
    ScenePlan,
    Status,
    StoryboardPlan,
)

DEFAULT_URL = "sqlite:///output/sceneref.db"
STATUSES: tuple[str, ...] = ("queued", "running", "completed", "failed")
UNFINISHED: tuple[str, ...] = ("queued", "running")

metadata = MetaData()

jobs_table = Table(
    "jobs",
    metadata,
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

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.request)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime) -> datetime:
    # SQLite drops the offset; every timestamp we write is UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database
    in_memory = not database or database == ":memory:" or parsed.query.get("mode") == "memory"
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if in_memory:
        # One shared connection, or every pooled connection would see its own empty database.
        kwargs["poolclass"] = StaticPool
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


class JobStore:
    def __init__(self, url: str = DEFAULT_URL):
        self.url = url
        self.engine = _make_engine(url)
        self._sqlite = self.engine.dialect.name == "sqlite"
        # SQLite allows one writer at a time; serialising our own writes avoids lock errors
        # between threads of this process (other processes still rely on busy_timeout).
        self._write_lock = threading.Lock() if self._sqlite else None
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock or nullcontext(), self.engine.begin() as conn:
            yield conn

    # --- jobs -------------------------------------------------------------------------

    def create(self, generation_id: str, owner: str, request: dict, *, offline: bool) -> None:
        if not owner:
            raise ValueError("owner must be non-empty")
        now = _now()
        with self._write() as conn:
            conn.execute(
                insert(jobs_table).values(
                    generation_id=generation_id,
                    owner=owner,
                    status="queued",
                    progress=0,
                    stage="queued",
                    request=request,
                    storyboard=None,
                    error=None,
                    offline=offline,
                    created_at=now,
                    updated_at=now,
                )
            )

    def get(self, generation_id: str, owner: str | None = None) -> JobRecord | None:
        """`owner` given: another owner's job reads as missing, so ids cannot be probed."""
        query = select(jobs_table).where(jobs_table.c.generation_id == generation_id)
        if owner is not None:
            query = query.where(jobs_table.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _record(row) if row else None

    def update(
        self,
        generation_id: str,
        *,
        status: Status | None = None,
        progress: int | None = None,
        stage: str | None = None,
        error: str | None = None,
        clear_error: bool = False,
        storyboard: Sequence[ScenePlan | dict] | None = None,
    ) -> None:
        """Set the given fields; None leaves a field unchanged (`clear_error` removes an
        earlier failure's reason when a job is resumed)."""
        values: dict[str, Any] = {"updated_at": _now()}
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
            values["status"] = status
        if progress is not None:
            if not 0 <= progress <= 100:
                raise ValueError(f"progress must be 0-100, got {progress}")
            values["progress"] = int(progress)
        if stage is not None:
            values["stage"] = stage
        if error is not None:
            values["error"] = error
        elif clear_error:
            values["error"] = None
        if storyboard is not None:
            values["storyboard"] = [ScenePlan.model_validate(s).model_dump(mode="json") for s in storyboard]
        with self._write() as conn:
            result = conn.execute(
                update(jobs_table).where(jobs_table.c.generation_id == generation_id).values(**values)
            )
        if result.rowcount == 0:
            raise JobNotFound(generation_id)

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: what a restarted service resumes."""
        query = (
            select(jobs_table)
            .where(jobs_table.c.status.in_(UNFINISHED))
            .order_by(jobs_table.c.created_at, jobs_table.c.generation_id)
        )
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    # --- scenes -----------------------------------------------------------------------

    def checkpoint_scene(self, generation_id: str, scene: SceneResult) -> None:
        """Insert or replace the scene's result (a resumed scene may be checkpointed twice)."""
        values = {
            "generation_id": generation_id,
            "scene_number": scene.scene_number,
            "result": scene.model_dump(mode="json"),
            "completed_at": _now(),
        }
        with self._write() as conn:
            exists = conn.execute(
                select(jobs_table.c.generation_id).where(jobs_table.c.generation_id == generation_id)
            ).first()
            if exists is None:
                raise JobNotFound(generation_id)
            _upsert(conn, values)
            conn.execute(
                update(jobs_table).where(jobs_table.c.generation_id == generation_id).values(updated_at=_now())
            )

    def scenes(self, generation_id: str) -> list[SceneResult]:
        query = (
            select(scenes_table.c.result)
            .where(scenes_table.c.generation_id == generation_id)
            .order_by(scenes_table.c.scene_number)
        )
        with self.engine.connect() as conn:
            return [SceneResult.model_validate(row.result) for row in conn.execute(query)]


def _upsert(conn: Connection, values: dict[str, Any]) -> None:
    changed = {"result": values["result"], "completed_at": values["completed_at"]}
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        statement = dialect_insert(scenes_table).values(**values)
        conn.execute(
            statement.on_conflict_do_update(index_elements=["generation_id", "scene_number"], set_=changed)
        )
        return
    # Other databases: update, else insert (a concurrent twin insert fails on the primary key).
    found = conn.execute(
        update(scenes_table)
        .where(scenes_table.c.generation_id == values["generation_id"])
        .where(scenes_table.c.scene_number == values["scene_number"])
        .values(**changed)
    )
    if found.rowcount == 0:
        conn.execute(insert(scenes_table).values(**values))


def _record(row: Any) -> JobRecord:
    data = dict(row)
    data["created_at"] = _aware(data["created_at"])
    data["updated_at"] = _aware(data["updated_at"])
    return JobRecord.model_validate(data)


# --- status shape ---------------------------------------------------------------------


def to_status(
    record: JobRecord, scenes: Sequence[SceneResult], url_for: Callable[[str], str]
) -> GenerationStatus:
    """The guide's GET /api/status body. `url_for(image_key)` turns an artifact key into a URL
    the client can fetch (signed, in the service), so this module stays free of HTTP."""
    request = record.generation_request()
    done = {scene.scene_number: scene for scene in scenes}
    planned = {plan.scene_number: plan for plan in record.storyboard or []}
    entries: list[dict[str, Any]] = []
    for number in sorted(planned.keys() | done.keys()):
        plan = planned.get(number)
        result = done.get(number)
        entry: dict[str, Any] = {
            "scene_number": number,
            "duration": plan.duration if plan else result.duration,  # type: ignore[union-attr]
            "prompt": plan.prompt if plan else result.original_prompt,  # type: ignore[union-attr]
            "status": "completed" if result else "pending",
        }
        if result:
            entry.update(
                enhanced_prompt=result.enhanced_prompt,
                reference_image_url=url_for(result.reference_image_key),
                quality_score=result.quality_score,
                prompt_score=result.prompt_score,
                below_threshold=result.below_threshold,
                user_provided=result.user_provided,
            )
        entries.append(entry)
    return GenerationStatus(
        generation_id=record.generation_id,
        status=record.status,
        progress=record.progress,
        advanced_image_generation_used=True,
        storyboard_plan=StoryboardPlan(
            advanced_image_settings=AdvancedImageSettings(
                quality_threshold=request.advanced_image_quality_threshold,
                num_variations=request.advanced_image_num_variations,
                max_enhancement_iterations=request.advanced_image_max_enhancement_iterations,
            ),
            scenes=entries,
        ),
        error=record.error,
        offline=record.offline,
    )
