"""Job store, its queries: one row per generation and one per finished scene, over any SQLAlchemy
URL (SQLite for one machine, PostgreSQL via psycopg 3 for clusters). The tables are in
`tables.py`, the leases and their fencing in `leases.py`, the records it returns in `records.py`.

Jobs are *claimed* with a lease, not just found: `claim` is an atomic compare-and-set on the
row's `lease_token`, so across any number of processes a job runs in one runner at a time, and
the token doubles as a fencing token: a write that carries a `Lease` lands only while the row
still holds that token and holder, so a runner that lost its lease (paused, partitioned,
outlived its expiry) can no longer change the job. Times are UTC from the writer's clock;
lease lengths (seconds) must stay well above the clock skew between nodes (NTP keeps it in ms).

Scenes are checkpointed as soon as they are selected, so any runner resumes a generation at
its next scene, and the status endpoint reads everything it shows from here. Every progress
event goes to the generation's event log (`events`, numbered by `seq` from 1), so any replica
streams a generation's progress and a reconnecting client asks for what came after its last
event; the final status event is written in the same transaction as the final status, so a
reader that sees a finished job also sees its last event. The schema is
managed by Alembic (`pipeline/jobs/migrations`) and upgraded when a store opens. Methods are
synchronous and thread-safe; async callers run them in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from pipeline.jobs.leases import Lease, LeaseLost, fenced, no_live_lease
from pipeline.jobs.limits import AdmissionLimits, AdmissionRefused, check_admission
from pipeline.jobs.records import EventPage, EventRecord, GenerationSummary, JobNotFound, JobRecord, event_row
from pipeline.jobs.tables import FINAL_EVENT, FINISHED, STATUSES, UNFINISHED, events_table, jobs_table, scenes_table
from pipeline.schemas import SceneResult, ScenePlan, Status

log = logging.getLogger("sceneref.jobs")

DEFAULT_URL = "sqlite:///output/sceneref.db"
# How many candidates one claim looks at; losing a race on one just moves to the next.
_CLAIM_CANDIDATES = 16
# The PostgreSQL advisory lock (a bigint of our choosing) that serialises admissions.
_ADMISSION_LOCK = 0x5CE4E4EF_AD


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite drops the offset; every timestamp we write is UTC.
    if value is None:
        return None
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
    def __init__(self, url: str = DEFAULT_URL, *, admission_wait_s: float = 10.0):
        """`admission_wait_s`: how long an admission waits for the admission lock on PostgreSQL
        before it gives up with the store's temporary error (a 503 with Retry-After), so a
        stuck holder cannot hang every submission (SQLite's writers wait `busy_timeout`)."""
        from pipeline.jobs.migrations import upgrade

        self.url = url
        self.admission_wait_s = admission_wait_s
        self.engine = _make_engine(url)
        self._sqlite = self.engine.dialect.name == "sqlite"
        # SQLite allows one writer at a time; serialising our own writes avoids lock errors
        # between threads of this process (other processes still rely on busy_timeout).
        self._write_lock = threading.Lock() if self._sqlite else None
        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """One round trip to the database (readiness): raises the driver's error when it cannot
        be reached."""
        with self.engine.connect() as conn:
            conn.execute(select(literal(1)))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock or nullcontext(), self.engine.begin() as conn:
            yield conn

    def _missing_or_lost(self, conn: Connection, generation_id: str, lease: Lease | None) -> Exception:
        exists = conn.execute(
            select(jobs_table.c.generation_id).where(jobs_table.c.generation_id == generation_id)
        ).first()
        if exists is None:
            return JobNotFound(generation_id)
        return LeaseLost(f"lease on {generation_id} (token {lease.token if lease else '-'}) was lost")

    # --- jobs -------------------------------------------------------------------------

    @contextmanager
    def _admission(self) -> Iterator[Connection]:
        """A write transaction that admissions enter one at a time, across every process: what
        it counts cannot change before its insert commits. One key for all owners, because the
        service-wide queue bound counts every owner's jobs (per-owner locks would let owners
        racing each other overrun it); an admission holds it for a few statements."""
        with self._write_lock or nullcontext(), self.engine.begin() as conn:
            if self._sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite's one writer, taken before the counts
            else:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, round(self.admission_wait_s * 1000))}")
                conn.execute(select(func.pg_advisory_xact_lock(_ADMISSION_LOCK)))
            yield conn

    def create(
        self, generation_id: str, owner: str, request: dict, *, offline: bool, reference_key: str | None = None,
        limits: AdmissionLimits | None = None,
    ) -> None:
        """Persist everything a job needs before anyone answers for it; `reference_key` is the
        user's image, already in the artifact store. With `limits`, admission is checked in the
        same serialised transaction as the insert and a refusal raises `AdmissionRefused`, so
        no race between replicas or threads passes a submission over a limit."""
        if not owner:
            raise ValueError("owner must be non-empty")
        now = _now()
        with self._admission() if limits is not None else self._write() as conn:
            if limits is not None and (refusal := check_admission(_Counts(conn), owner, limits, now)) is not None:
                raise AdmissionRefused(refusal)
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
                    reference_key=reference_key,
                    lease_token=0,
                    cancel_requested=False,
                )
            )
            _append(conn, generation_id, [event_row("queued", "queued", 0, "queued", at=now)])

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
        lease: Lease | None = None,
    ) -> None:
        """Set the given fields; None leaves a field unchanged (`clear_error` removes an
        earlier failure's reason when a job is resumed). With `lease`, the write is fenced:
        it lands only while the lease is current, else `LeaseLost` and nothing changes."""
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
        where = fenced(lease) if lease else jobs_table.c.generation_id == generation_id
        if lease and lease.generation_id != generation_id:
            raise ValueError("lease is for another job")
        with self._write() as conn:
            if conn.execute(update(jobs_table).where(where).values(**values)).rowcount == 0:
                raise self._missing_or_lost(conn, generation_id, lease)

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first (held or not: use `claim` to run one)."""
        query = (
            select(jobs_table)
            .where(jobs_table.c.status.in_(UNFINISHED))
            .order_by(jobs_table.c.created_at, jobs_table.c.generation_id)
        )
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    # --- leases -----------------------------------------------------------------------

    def claim(self, holder: str, lease_s: float, *, generation_id: str | None = None) -> Lease | None:
        """Take the oldest unfinished job nobody holds (absent or expired lease, no cancel
        request), or that one job; None when there is none.

        Race-free by compare-and-set: the UPDATE only matches while the row still has the token
        we read, so of several claimers of one job exactly one wins (PostgreSQL re-checks the
        condition on the locked row; SQLite has one writer at a time) and the others move on.
        Jobs whose cancellation was asked while nobody held them are ended `cancelled` here.
        """
        c = jobs_table.c
        while True:
            now = _now()
            query = select(c.generation_id, c.lease_token).where(
                c.status.in_(UNFINISHED), c.cancel_requested.is_(False), no_live_lease(now)
            )
            if generation_id is not None:
                query = query.where(c.generation_id == generation_id)
            query = query.order_by(c.created_at, c.generation_id).limit(_CLAIM_CANDIDATES)
            with self._write() as conn:
                self._end_cancelled(conn, now)
                candidates = conn.execute(query).all()
                for gid, seen in candidates:
                    expires = now + timedelta(seconds=lease_s)
                    won = conn.execute(
                        update(jobs_table)
                        .where(
                            c.generation_id == gid,
                            c.lease_token == seen,
                            c.status.in_(UNFINISHED),
                            c.cancel_requested.is_(False),
                            no_live_lease(now),
                        )
                        .values(
                            status="running",
                            lease_holder=holder,
                            lease_expires_at=expires,
                            lease_token=seen + 1,
                            updated_at=now,
                        )
                    ).rowcount
                    if won == 1:
                        return Lease(gid, holder, seen + 1, expires)
            if len(candidates) < _CLAIM_CANDIDATES:
                return None  # every candidate went to someone else: nothing left to claim

    def renew(self, lease: Lease, lease_s: float) -> Lease:
        expires = _now() + timedelta(seconds=lease_s)
        with self._write() as conn:
            changed = conn.execute(
                update(jobs_table).where(fenced(lease)).values(lease_expires_at=expires)
            ).rowcount
            if changed == 0:
                raise self._missing_or_lost(conn, lease.generation_id, lease)
        return Lease(lease.generation_id, lease.holder, lease.token, expires)

    def release(self, lease: Lease, *, events: Sequence[dict[str, Any]] = ()) -> None:
        """Give the job up unfinished (a replica shutting down): it stays resumable and any
        runner may claim it at once. Later writes with this lease are refused. `events` (the
        runner's still unwritten ones) are appended in the same transaction."""
        with self._write() as conn:
            changed = conn.execute(
                update(jobs_table)
                .where(fenced(lease))
                .values(lease_holder=None, lease_expires_at=None, updated_at=_now())
            ).rowcount
            if changed == 0:
                raise self._missing_or_lost(conn, lease.generation_id, lease)
            _append(conn, lease.generation_id, events)

    def finish(
        self, lease: Lease, status: Status, *, error: str | None = None, events: Sequence[dict[str, Any]] = ()
    ) -> None:
        """The final status, fenced on the token only, so a retry after a commit whose answer
        was lost succeeds. Clears the lease: later writes with it are refused. `events` (the
        runner's still unwritten ones) go before the final status event, in its transaction."""
        if status not in FINISHED:
            raise ValueError(f"final status must be one of {FINISHED}, got {status!r}")
        now = _now()
        values: dict[str, Any] = dict(
            status=status, stage=status, error=error, lease_holder=None, lease_expires_at=None,
            finished_at=now, updated_at=now,
        )
        if status == "completed":
            values["progress"] = 100
        elif events:  # the progress they reached, as an event write would have shown it
            values["progress"] = max(0, min(100, int(events[-1].get("progress") or 0)))
        c = jobs_table.c
        with self._write() as conn:
            landed = conn.execute(select(c.status, c.lease_holder).where(
                c.generation_id == lease.generation_id, c.lease_token == lease.token)).first()
            if landed is not None and landed.status == status and landed.lease_holder is None and landed.status in FINISHED:
                return  # a retry of a write that landed (its answer was lost): its events are there
            changed = conn.execute(
                update(jobs_table)
                .where(c.generation_id == lease.generation_id, c.lease_token == lease.token)
                .values(**values)
            ).rowcount
            if changed == 0:
                raise self._missing_or_lost(conn, lease.generation_id, lease)
            _append(conn, lease.generation_id, events)
            _append_final(conn, lease.generation_id, now)

    # --- cancellation and resumption --------------------------------------------------

    def request_cancel(self, generation_id: str, owner: str) -> bool:
        """Ask the job to stop; False if it is not this owner's (or does not exist). A job
        nobody is running (queued, or its runner died) ends `cancelled` at once; a running one
        ends at its runner's next step. Asking for a finished job changes nothing."""
        c = jobs_table.c
        now = _now()
        with self._write() as conn:
            found = conn.execute(
                update(jobs_table)
                .where(c.generation_id == generation_id, c.owner == owner, c.status.in_(UNFINISHED))
                .values(cancel_requested=True, updated_at=now)
            ).rowcount
            if not found:
                return conn.execute(
                    select(c.generation_id).where(c.generation_id == generation_id, c.owner == owner)
                ).first() is not None
            self._end_cancelled(conn, now, generation_id)
        return True

    def _end_cancelled(self, conn: Connection, now: datetime, generation_id: str | None = None) -> None:
        c = jobs_table.c
        statement = update(jobs_table).where(
            c.status.in_(UNFINISHED), c.cancel_requested.is_(True), no_live_lease(now)
        )
        if generation_id is not None:
            statement = statement.where(c.generation_id == generation_id)
        ended = conn.execute(
            statement.values(
                status="cancelled", stage="cancelled", lease_holder=None, lease_expires_at=None,
                finished_at=now, updated_at=now,
            ).returning(c.generation_id)
        ).scalars().all()
        for gid in ended:  # ended without a runner: the final event is written here
            _append_final(conn, gid, now)

    def cancel_requested(self, generation_id: str) -> bool:
        with self.engine.connect() as conn:
            flag = conn.execute(
                select(jobs_table.c.cancel_requested).where(jobs_table.c.generation_id == generation_id)
            ).scalar()
        return bool(flag)

    def cancel_requested_among(self, generation_ids: Sequence[str]) -> set[str]:
        """Which of these jobs their owners asked to cancel: one query for all the jobs a
        replica runs, instead of one per job."""
        if not generation_ids:
            return set()
        c = jobs_table.c
        query = select(c.generation_id).where(c.generation_id.in_(list(generation_ids)), c.cancel_requested.is_(True))
        with self.engine.connect() as conn:
            return {row.generation_id for row in conn.execute(query)}

    def requeue(self, generation_id: str, owner: str, *, limits: AdmissionLimits | None = None) -> bool:
        """Put a failed or cancelled job back in the queue (error and cancel flag cleared), so
        the next runner resumes it at its next scene. False if it is not this owner's or not
        failed/cancelled. With `limits`, admitted like `create` (the active and queue limits,
        in the same serialised transaction; raises `AdmissionRefused`): cancelling and resuming
        cannot run more at once than a user may submit."""
        c = jobs_table.c
        with self._admission() if limits is not None else self._write() as conn:
            if limits is not None:  # only a resumable job is refused; any other is False, as without limits
                resumable = conn.execute(
                    select(c.generation_id)
                    .where(c.generation_id == generation_id, c.owner == owner, c.status.in_(("failed", "cancelled")))
                ).first()
                if resumable and (refusal := check_admission(_Counts(conn), owner, limits, _now(), resume=True)):
                    raise AdmissionRefused(refusal)
            requeued = conn.execute(
                update(jobs_table)
                .where(c.generation_id == generation_id, c.owner == owner, c.status.in_(("failed", "cancelled")))
                .values(
                    status="queued", stage="queued", error=None, cancel_requested=False,
                    lease_holder=None, lease_expires_at=None, finished_at=None, traces_removed_at=None,
                    updated_at=_now(),
                ).returning(c.progress)
            ).first()
            if requeued is None:
                return False
            _append(conn, generation_id, [event_row("queued", "queued", requeued.progress, "queued again (resume)",
                                                    data={"resumed": True})])
            return True

    # --- admission and retention ------------------------------------------------------

    # Each count reads a snapshot on a connection of its own: an early answer. The admission that
    # counts is the one `create(..., limits=...)` makes inside its serialised transaction.

    def count_active(self, owner: str) -> int:
        """This owner's queued and running jobs."""
        with self.engine.connect() as conn:
            return _Counts(conn).count_active(owner)

    def count_submitted_since(self, owner: str, since: datetime) -> int:
        with self.engine.connect() as conn:
            return _Counts(conn).count_submitted_since(owner, since)

    def oldest_submitted_since(self, owner: str, since: datetime) -> datetime | None:
        """When this owner's oldest submission inside the window was made: the window frees a
        slot when it leaves (the Retry-After of a per-window refusal)."""
        with self.engine.connect() as conn:
            return _Counts(conn).oldest_submitted_since(owner, since)

    def count_unfinished(self) -> int:
        """Queued and running jobs of all owners: the global queue bound."""
        with self.engine.connect() as conn:
            return _Counts(conn).count_unfinished()

    def expired(self, *, finished_before: datetime, limit: int) -> list[str]:
        """Ids of finished jobs (completed, failed, cancelled) that finished before, oldest first."""
        c = jobs_table.c
        query = (
            select(c.generation_id)
            .where(c.status.in_(FINISHED), c.finished_at < finished_before)
            .order_by(c.finished_at, c.generation_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [row.generation_id for row in conn.execute(query)]

    def traces_expired(self, *, finished_before: datetime, limit: int) -> list[str]:
        """Finished jobs whose trace files are still there and due for removal, oldest first."""
        c = jobs_table.c
        query = (
            select(c.generation_id)
            .where(c.status.in_(FINISHED), c.finished_at < finished_before, c.traces_removed_at.is_(None))
            .order_by(c.finished_at, c.generation_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [row.generation_id for row in conn.execute(query)]

    def mark_traces_removed(self, generation_id: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(jobs_table).where(jobs_table.c.generation_id == generation_id).values(traces_removed_at=_now())
            )

    def known(self, generation_ids: Sequence[str]) -> set[str]:
        """Which of these ids have a job row: retention's orphan sweep removes stored objects
        whose generation has none. One query per call; callers pass batches."""
        if not generation_ids:
            return set()
        query = select(jobs_table.c.generation_id).where(jobs_table.c.generation_id.in_(list(generation_ids)))
        with self.engine.connect() as conn:
            return {row.generation_id for row in conn.execute(query)}

    def delete(self, generation_id: str) -> bool:
        """Remove the job row and its scenes (artifacts and traces are the caller's)."""
        with self._write() as conn:
            conn.execute(delete(events_table).where(events_table.c.generation_id == generation_id))
            conn.execute(delete(scenes_table).where(scenes_table.c.generation_id == generation_id))
            return conn.execute(
                delete(jobs_table).where(jobs_table.c.generation_id == generation_id)
            ).rowcount == 1

    # --- scenes -----------------------------------------------------------------------

    def checkpoint_scene(self, generation_id: str, scene: SceneResult, lease: Lease | None = None) -> bool:
        """Store a finished scene; with `lease`, fenced like `update`.

        A scene's image never changes once checkpointed: for a scene number already stored
        with a *different* reference_image_key the first one is kept (and False returned), so
        a late or duplicate runner can never swap the image later scenes were chained on. The
        same image may be checkpointed again (a resumed run), which refreshes its result.
        """
        c = jobs_table.c
        now = _now()
        where = fenced(lease) if lease else c.generation_id == generation_id
        if lease and lease.generation_id != generation_id:
            raise ValueError("lease is for another job")
        result = scene.model_dump(mode="json")
        key = (scenes_table.c.generation_id == generation_id, scenes_table.c.scene_number == scene.scene_number)
        with self._write() as conn:
            # Touching the job row first takes its lock (PostgreSQL) or the write lock
            # (SQLite): checkpoints of one job are serialised and fenced atomically.
            if conn.execute(update(jobs_table).where(where).values(updated_at=now)).rowcount == 0:
                raise self._missing_or_lost(conn, generation_id, lease)
            stored = conn.execute(select(scenes_table.c.result).where(*key)).first()
            if stored is None:
                conn.execute(
                    insert(scenes_table).values(
                        generation_id=generation_id, scene_number=scene.scene_number, result=result, completed_at=now
                    )
                )
                return True
            if stored.result.get("reference_image_key") != scene.reference_image_key:
                log.warning(
                    "generation %s scene %d is already checkpointed with another image; keeping the first",
                    generation_id, scene.scene_number,
                )
                return False
            conn.execute(update(scenes_table).where(*key).values(result=result, completed_at=now))
            return True

    def scenes(self, generation_id: str) -> list[SceneResult]:
        query = (
            select(scenes_table.c.result)
            .where(scenes_table.c.generation_id == generation_id)
            .order_by(scenes_table.c.scene_number)
        )
        with self.engine.connect() as conn:
            return [SceneResult.model_validate(row.result) for row in conn.execute(query)]


    # --- events -----------------------------------------------------------------------

    def append_events(
        self,
        generation_id: str,
        events: Sequence[dict[str, Any]],
        lease: Lease | None = None,
        *,
        progress: int | None = None,
        stage: str | None = None,
    ) -> list[int]:
        """Append events (`event_row`) to the generation's log and answer their `seq`s; with
        `progress`/`stage`, the job row shows them too, in the same transaction. With `lease`,
        fenced like `update`: a runner that lost its lease appends nothing (`LeaseLost`)."""
        if lease and lease.generation_id != generation_id:
            raise ValueError("lease is for another job")
        values: dict[str, Any] = {"updated_at": _now()}
        if progress is not None:
            if not 0 <= progress <= 100:
                raise ValueError(f"progress must be 0-100, got {progress}")
            values["progress"] = int(progress)
        if stage is not None:
            values["stage"] = stage
        where = fenced(lease) if lease else jobs_table.c.generation_id == generation_id
        with self._write() as conn:
            # The job row first: it takes the row lock (PostgreSQL) that numbers one job's
            # events without gaps or duplicates, and fences the write.
            if conn.execute(update(jobs_table).where(where).values(**values)).rowcount == 0:
                raise self._missing_or_lost(conn, generation_id, lease)
            return _append(conn, generation_id, events)

    def events_after(
        self, generation_id: str, owner: str | None, after_seq: int = 0, limit: int = 100
    ) -> EventPage | None:
        """The generation's events with seq > `after_seq`, oldest first, at most `limit`, and
        its status; None when it does not exist or (with `owner`) is another owner's."""
        c = jobs_table.c
        query = select(c.status).where(c.generation_id == generation_id)
        if owner is not None:
            query = query.where(c.owner == owner)
        e = events_table.c
        events = (
            select(events_table)
            .where(e.generation_id == generation_id, e.seq > after_seq)
            .order_by(e.seq)
            .limit(max(1, int(limit)))
        )
        with self.engine.connect() as conn:
            status = conn.execute(query).scalar()  # first: see EventPage
            if status is None:
                return None
            rows = conn.execute(events).mappings().all()
        return EventPage(status, [_event(row) for row in rows])

    def generations(
        self, owner: str, *, limit: int = 20, before: tuple[datetime, str] | None = None
    ) -> list[GenerationSummary]:
        """This owner's generations, newest first; `before` (created_at, generation_id) of the
        last one of the previous page continues the list (keyset pagination: stable while new
        generations arrive)."""
        c = jobs_table.c
        done = (
            select(func.count())
            .select_from(scenes_table)
            .where(scenes_table.c.generation_id == c.generation_id)
            .scalar_subquery()
        )
        query = select(
            c.generation_id, c.status, c.stage, c.progress, c.request, c.created_at, c.finished_at, c.storyboard,
            c.error, c.offline, done.label("scenes_completed"),
        ).where(c.owner == owner)
        if before is not None:
            at, gid = before
            query = query.where(or_(c.created_at < at, and_(c.created_at == at, c.generation_id < gid)))
        query = query.order_by(c.created_at.desc(), c.generation_id.desc()).limit(max(1, int(limit)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            GenerationSummary(
                generation_id=row.generation_id, status=row.status, stage=row.stage, progress=row.progress,
                prompt=str((row.request or {}).get("prompt", "")), created_at=_aware(row.created_at),
                finished_at=_aware(row.finished_at), scene_count=len(row.storyboard) if row.storyboard else None,
                scenes_completed=int(row.scenes_completed or 0), error=row.error, offline=bool(row.offline),
            )
            for row in rows
        ]


class _Counts:
    """The counts admission reads (`pipeline.jobs.limits.check_admission`), on one connection: inside
    the admission transaction they cannot change before its insert commits."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def _count(self, *where: Any) -> int:
        return int(self.conn.execute(select(func.count()).select_from(jobs_table).where(*where)).scalar())

    def count_active(self, owner: str) -> int:
        return self._count(jobs_table.c.owner == owner, jobs_table.c.status.in_(UNFINISHED))

    def count_submitted_since(self, owner: str, since: datetime) -> int:
        return self._count(jobs_table.c.owner == owner, jobs_table.c.created_at >= since)

    def oldest_submitted_since(self, owner: str, since: datetime) -> datetime | None:
        c = jobs_table.c
        value = self.conn.execute(select(func.min(c.created_at)).where(c.owner == owner, c.created_at >= since)).scalar()
        return _aware(value) if value is not None else None

    def count_unfinished(self) -> int:
        return self._count(jobs_table.c.status.in_(UNFINISHED))


def _append(conn: Connection, generation_id: str, events: Sequence[dict[str, Any]]) -> list[int]:
    """Insert events after the generation's last one. The caller holds the job row's lock."""
    if not events:
        return []
    e = events_table.c
    last = conn.execute(select(func.max(e.seq)).where(e.generation_id == generation_id)).scalar() or 0
    rows = [
        {
            "generation_id": generation_id, "seq": last + i, "at": ev.get("at") or _now(), "kind": ev["kind"],
            "stage": ev.get("stage") or ev["kind"], "progress": int(ev.get("progress") or 0),
            "scene": ev.get("scene"), "message": ev.get("message") or "", "data": ev.get("data") or {},
        }
        for i, ev in enumerate(events, start=1)
    ]
    conn.execute(insert(events_table), rows)
    return [row["seq"] for row in rows]


def _append_final(conn: Connection, generation_id: str, now: datetime) -> None:
    """The final status event, from the row just written (same transaction)."""
    c = jobs_table.c
    row = conn.execute(select(c.status, c.progress, c.error).where(c.generation_id == generation_id)).first()
    message = f"generation {row.status}" + (f": {row.error}" if row.error else "")
    data = {"status": row.status, "progress": row.progress, "error": row.error}
    _append(conn, generation_id, [event_row(FINAL_EVENT, row.status, row.progress, message, data=data, at=now)])


def _event(row: Any) -> EventRecord:
    data = dict(row)
    data["at"] = _aware(data["at"])
    data.pop("generation_id", None)
    return EventRecord.model_validate(data)


def _record(row: Any) -> JobRecord:
    data = dict(row)
    for name in ("created_at", "updated_at", "lease_expires_at", "finished_at", "traces_removed_at"):
        data[name] = _aware(data[name])
    return JobRecord.model_validate(data)
