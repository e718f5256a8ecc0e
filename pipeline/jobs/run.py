"""Running a claimed job: the runner's plan and scenes go to the job store as they happen, fenced
by the job's lease, so the status endpoint (or `sceneref generate`) always reads the truth and
any runner resumes from the last checkpointed scene.

The lifecycle, and why each rule is there:
- The lease is renewed in the background every `lease_s / 3`; losing it (someone took the job
  over after we stalled) stops the run at once and nothing more is written: the new holder owns
  the job. The same loop notices a cancel request from another replica and stops the run.
- The job store may go away for a while (a PostgreSQL restart or failover). Checkpoints and
  the final status are fenced and retried on transient database errors for up to
  `store_outage_s` (default STORE_OUTAGE_S, at least the lease): a run meets the outage at its
  next checkpoint, waits there and goes on by itself when the store is back. An outage shorter
  than the lease loses nothing; one up to `store_outage_s` loses nothing either, though another
  runner may take the job over at its next scene once the lease has expired. A longer one
  ends the job `failed` as transient (the user resumes it), never as an internal error; if even
  that write cannot land, the job stays `running` under a lease nobody renews, and its expiry
  lets any runner take the job over.
- Every progress event goes to the job's event log (what the SSE stream of any replica reads),
  batched in the background so the runner never waits for the database, fenced like any write.
  What is still pending at the end is written with the final status, in its transaction. Events
  the store could not take within the bound are dropped, never silently: the log gets a `gap`
  event saying how many were lost.
- A job whose scenes are all checkpointed is `completed`, whatever fails after (trace cleanup,
  a progress write): the user has every image.
- Cancelled from outside (Ctrl-C, a replica shutting down): the job ends `cancelled` if its
  owner asked, else the lease is released so any runner resumes it at once; the final write is
  shielded from the cancellation, which is then re-raised. A job never stays `running` with a
  live lease that nobody renews.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Callable

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from pipeline.aio import shielded
from pipeline.jobs.records import JobNotFound, event_row
from pipeline.jobs.store import JobStore
from pipeline.jobs.leases import Lease, LeaseLost
from pipeline.runner import GenerationError, ProgressEvent, Services, run_generation
from pipeline.schemas import SceneResult
from pipeline.settings import PipelineSettings

log = logging.getLogger("sceneref.service")

# How long a write that must land (checkpoint, final status) waits out a job store that cannot
# be reached, when the caller gives no bound; the Serve app takes it from JobSettings.
STORE_OUTAGE_S = 120.0
# Waits between its attempts; the last one repeats until the bound.
RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.5, 5.0)
# The kind of the event that announces events the log lost (data: {"lost": n}).
GAP_EVENT = "gap"
# Upper bound between two looks at the job's cancel flag when the caller gives none. Each look is
# a query per running job: a replica running dozens of jobs passes a longer one (the ingress
# looks at every renewal, lease_s / 3, and cancels jobs it runs itself at once).
CANCEL_POLL_S = 2.0


def store_unreachable(exc: BaseException) -> bool:
    """A database error that says the store could not be reached or lost the connection (or is
    locked, for SQLite): worth waiting out, unlike a rejected statement."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class StoreUnavailable(GenerationError):
    """The job store stayed unreachable for the whole bound: transient, the job can be resumed."""

    def __init__(self, what: str, waited_s: float):
        super().__init__(f"the job store could not be reached for {waited_s:.0f} s ({what})", retryable=True)


async def _retrying(fn: Callable[..., Any], *args: Any, within_s: float = STORE_OUTAGE_S, **kwargs: Any) -> Any:
    """`fn` in a worker thread, retried while the store cannot be reached, for `within_s` at
    most (then StoreUnavailable). Other errors (a lost lease, a bug) are raised at once."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    name = getattr(fn, "__name__", str(fn))
    for attempt in itertools.count():
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except DBAPIError as exc:
            if not store_unreachable(exc):
                raise
            waited = loop.time() - start
            if waited >= within_s:
                raise StoreUnavailable(name, waited) from exc
            delay = min(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)], within_s - waited)
            log.warning("%s failed (%s); retrying in %.1f s", name, _first_line(exc.orig), delay)
            await asyncio.sleep(delay)


async def execute_job(
    store: JobStore,
    lease: Lease,
    services: Services,
    settings: PipelineSettings,
    *,
    lease_s: float = 30.0,
    on_event: Callable[[ProgressEvent], None] | None = None,
    cancel_poll_s: float = CANCEL_POLL_S,
    store_outage_s: float = STORE_OUTAGE_S,
) -> list[SceneResult] | None:
    """Run or resume the job held by `lease` and record how it ended.

    Returns the scenes when the job completed; None when it failed or was cancelled (the store
    says which, and why), when the lease was lost (the new holder decides), or when the store
    could not be reached to say how it ended (the lease expires: another runner decides). It
    raises nothing but a cancellation of its own task.
    """
    gid = lease.generation_id
    within = max(store_outage_s, 0.0)
    try:
        record = await _retrying(store.get, gid, within_s=within)
        if record is None:
            raise JobNotFound(gid)
        completed = await _retrying(store.scenes, gid, within_s=within)
        await _retrying(store.update, gid, stage="running", clear_error=True, lease=lease, within_s=within)
    except (LeaseLost, JobNotFound, StoreUnavailable) as exc:
        log.warning("generation %s not started: %s", gid, exc)
        return None
    except asyncio.CancelledError:  # stopped before the run began: never leave it held by nobody
        await shielded(_end_interrupted(_Job(store, lease, None, [], within)))
        raise
    except Exception:
        log.exception("generation %s not started: reading it failed; its lease expires for another runner", gid)
        return None
    job = _Job(store, lease, record.storyboard, completed, within)
    progress = _EventWriter(store, gid, lease, within)

    async def event(e: ProgressEvent) -> None:
        progress.push(e)
        if on_event is not None:
            try:
                on_event(e)
            except Exception:  # a display problem is not the job's problem
                log.exception("on_event failed for generation %s", gid)

    run = asyncio.ensure_future(
        run_generation(
            gid,
            record.generation_request(),
            services,
            settings,
            reference_key=record.reference_key,
            storyboard=record.storyboard,
            completed=completed,
            start_progress=record.progress,  # what the status already shows: never less
            on_event=event,
            on_plan=job.plan,
            on_scene=job.scene,
        )
    )
    keeper = _LeaseKeeper(store, lease, lease_s, run, cancel_poll_s)
    keeper_task = asyncio.ensure_future(keeper.run())
    try:
        try:
            scenes = await run
        finally:
            keeper_task.cancel()
            job.leftover = await progress.stop()
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling() > 0:  # we were cancelled, not just the run
            await shielded(_end_interrupted(job))
            raise
        if keeper.reason == "lost":
            return None
        return await shielded(job.end("cancelled"))
    except LeaseLost:
        log.warning("generation %s: lease lost, stopping without further writes", gid)
        return None
    except GenerationError as exc:
        log.error("generation %s failed: %s", gid, exc)
        reason = str(exc)
        if getattr(exc, "retryable", False):
            reason += " (a transient error: the job can be resumed)"
        return await shielded(job.end("failed", reason))
    except Exception as exc:  # a bug must still end the job visibly, with finished scenes kept
        if isinstance(exc, DBAPIError) and store_unreachable(exc):  # a store outage met outside the retries
            log.warning("generation %s stopped: the job store could not be reached (%s)", gid, _first_line(exc.orig))
            return await shielded(job.end("failed", "the job store could not be reached (a transient error: the job "
                                                     "can be resumed)"))
        log.exception("generation %s crashed", gid)
        return await shielded(job.end("failed", f"internal error ({type(exc).__name__}); finished scenes are kept"))
    await shielded(job.end("completed"))
    return scenes


async def _end_interrupted(job: "_Job") -> None:
    """Stopped from outside: cancelled if the owner asked, else left for anyone to resume.
    Nothing here waits out a store outage (a replica shutting down has seconds): a write that
    cannot land leaves the job to its lease's expiry."""
    gid = job.lease.generation_id
    try:
        if job.all_checkpointed() or await _retrying(job.store.cancel_requested, gid, within_s=RETRY_DELAYS_S[2]):
            job.within_s = min(job.within_s, RETRY_DELAYS_S[2])
            await job.end("cancelled")
        else:
            await _retrying(job.store.release, job.lease, events=job.leftover, within_s=RETRY_DELAYS_S[2])
            log.info("generation %s released unfinished; any runner may resume it", gid)
    except (LeaseLost, JobNotFound):
        pass
    except Exception as exc:
        log.warning("generation %s: not released (%s); its lease expires for another runner", gid, exc)


async def run_claimed(
    store: JobStore,
    holder: str,
    services: Services,
    settings: PipelineSettings,
    *,
    lease_s: float = 30.0,
    generation_id: str | None = None,
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> bool:
    """Claim one job (the oldest claimable, or `generation_id`) and run it to its end.
    False when there was nothing to claim: a claim loop's signal to wait."""
    lease = await _retrying(store.claim, holder, lease_s, generation_id=generation_id)
    if lease is None:
        return False
    await execute_job(store, lease, services, settings, lease_s=lease_s, on_event=on_event)
    return True


class _Job:
    """The fenced writes of one run, and what it has checkpointed so far."""

    def __init__(
        self, store: JobStore, lease: Lease, storyboard: list | None, completed: list[SceneResult], within_s: float,
    ):
        self.store, self.lease, self.within_s = store, lease, within_s
        self.total = len(storyboard) if storyboard else None
        self.checkpointed = {s.scene_number for s in completed}
        self.leftover: list[dict] = []  # event rows the event writer left: written with the final status

    def all_checkpointed(self) -> bool:
        return self.total is not None and len(self.checkpointed) >= self.total

    async def plan(self, storyboard: list) -> None:
        await _retrying(
            self.store.update, self.lease.generation_id, storyboard=storyboard, lease=self.lease, within_s=self.within_s,
        )
        self.total = len(storyboard)

    async def scene(self, result: SceneResult) -> None:
        await _retrying(self.store.checkpoint_scene, self.lease.generation_id, result, self.lease, within_s=self.within_s)
        self.checkpointed.add(result.scene_number)

    async def end(self, status: str, error: str | None = None) -> list[SceneResult] | None:
        """The final, fenced status (with the events still pending); a job with every scene
        checkpointed is `completed`. Raises nothing: a status that cannot be written is left to
        the lease's expiry."""
        gid = self.lease.generation_id
        if self.all_checkpointed():
            status, error = "completed", None
        try:
            await _retrying(self.store.finish, self.lease, status, error=error, events=self.leftover, within_s=self.within_s)
        except (LeaseLost, JobNotFound) as exc:
            log.warning("generation %s: final status %s not written: %s", gid, status, exc)
            return None
        except Exception as exc:
            log.error(
                "generation %s: final status %s not written (%s); the job stays running until its lease expires, "
                "then another runner takes it over", gid, status, exc,
            )
            return None
        if status != "completed":
            return None
        try:
            return await _retrying(self.store.scenes, gid, within_s=self.within_s)
        except Exception as exc:
            log.warning("generation %s completed; its scenes could not be read back (%s)", gid, exc)
            return None


class _LeaseKeeper:
    """Renews the lease every lease_s / 3 and watches the cancel flag; stops the run (by
    cancelling it) when the lease is lost or the owner asked to cancel."""

    def __init__(self, store: JobStore, lease: Lease, lease_s: float, run: asyncio.Future, cancel_poll_s: float):
        self.store, self.lease, self.lease_s, self.run_future = store, lease, lease_s, run
        self.cancel_poll_s = cancel_poll_s
        self.reason: str | None = None  # "lost" | "cancel"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        every = self.lease_s / 3
        tick = min(every, self.cancel_poll_s)
        next_renewal = loop.time() + every
        while not self.run_future.done():
            await asyncio.sleep(tick)
            try:
                if loop.time() >= next_renewal:
                    self.lease = await asyncio.to_thread(self.store.renew, self.lease, self.lease_s)
                    next_renewal = loop.time() + every
                if await asyncio.to_thread(self.store.cancel_requested, self.lease.generation_id):
                    return self._stop("cancel")
            except (LeaseLost, JobNotFound) as exc:
                log.warning("generation %s: %s", self.lease.generation_id, exc)
                return self._stop("lost")
            except Exception as exc:  # transient: the next tick tries again, fencing keeps us safe
                log.warning("generation %s: lease renewal failed (%s)", self.lease.generation_id,
                            _first_line(getattr(exc, "orig", None) or exc))

    def _stop(self, reason: str) -> None:
        self.reason = reason
        self.run_future.cancel()


class _EventWriter:
    """Events to the job's log off the critical path: the runner never waits for the database.
    One write at a time takes everything pending (up to BATCH events) in one fenced transaction
    that also moves the job's progress and stage to the newest event's, so a busy database gets
    fewer, larger writes and the log keeps the runner's order.

    A store that cannot be reached is waited out like a checkpoint (`within_s`): the events stay
    pending and are written when it is back. Events are dropped only when the store stays away
    longer, when MAX_PENDING are waiting, or when a write fails ATTEMPTS times for another
    reason; each drop is counted and the next write (or the final status's) starts with a `gap`
    event saying how many were lost, so a reader of the log always learns of a gap. `stop()`
    hands what is still pending to the final status, which writes it in its own transaction. A
    runner that lost its lease, or whose job already has its final status, writes nothing."""

    BATCH = 200
    ATTEMPTS = 3  # for an error that is not the store being unreachable (a rejected row)
    RETRY_S = 0.5  # the first wait after a failed write; doubled up to RETRY_MAX_S
    RETRY_MAX_S = 5.0
    MAX_PENDING = 5000  # a database down for long must not grow a replica's memory without bound
    FLUSH_S = 5.0  # at the end, how long the final status waits for a write in flight

    def __init__(self, store: JobStore, generation_id: str, lease: Lease, within_s: float = STORE_OUTAGE_S):
        self.store, self.generation_id, self.lease, self.within_s = store, generation_id, lease, within_s
        self.pending: list[ProgressEvent] = []
        self.task: asyncio.Task | None = None
        self.closed = False  # nothing more is written (lease lost, or stopped)
        self.stopping = False
        self.lost = 0  # events dropped and not yet announced by a gap event
        self.last: ProgressEvent | None = None
        self.wake = asyncio.Event()  # cuts a retry wait short when stopping

    def push(self, event: ProgressEvent) -> None:
        if self.closed or self.stopping:
            return
        self.last = event
        if len(self.pending) >= self.MAX_PENDING:
            self.lost += 1
            return
        self.pending.append(event)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())

    def _rows(self, batch: list[ProgressEvent], lost: int) -> list[dict]:
        rows = []
        if lost:
            ref = batch[0] if batch else self.last
            stage, progress = (ref.stage, ref.progress) if ref is not None else ("running", 0)
            message = f"{lost} progress event{'s' if lost != 1 else ''} could not be stored and are missing here"
            rows.append(event_row(GAP_EVENT, stage, progress, message, data={"lost": lost}))
        rows += [
            event_row(e.kind or e.stage, e.stage, e.progress, e.message, scene=e.scene, data=e.data, at=e.at)
            for e in batch
        ]
        return rows

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        failures, failing_since, wait = 0, None, self.RETRY_S
        while (self.pending or self.lost) and not (self.closed or self.stopping):
            batch, lost = self.pending[: self.BATCH], self.lost
            newest = batch[-1] if batch else None
            try:
                await asyncio.to_thread(
                    self.store.append_events, self.generation_id, self._rows(batch, lost), self.lease,
                    progress=newest.progress if newest else None, stage=newest.stage if newest else None,
                )
            except (LeaseLost, JobNotFound) as exc:
                log.warning("generation %s: events not written: %s", self.generation_id, exc)
                self.closed, self.pending = True, []
                return
            except Exception as exc:
                failures += 1
                failing_since = loop.time() if failing_since is None else failing_since
                unreachable = isinstance(exc, DBAPIError) and store_unreachable(exc)
                if (loop.time() - failing_since < self.within_s) if unreachable else failures < self.ATTEMPTS:
                    if failures == 1:
                        log.warning("generation %s: event write failed (%s); %d events wait", self.generation_id,
                                    _first_line(getattr(exc, "orig", None) or exc), len(self.pending))
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    wait = min(wait * 2, self.RETRY_MAX_S)
                    continue
                # Given up: a store still away drops the whole backlog, a rejected batch only itself.
                dropped = len(self.pending) if unreachable else len(batch)
                log.warning("generation %s: %d events dropped after %d failed writes (%s); a gap event will say so",
                            self.generation_id, dropped, failures, _first_line(exc))
                del self.pending[:dropped]
                self.lost += dropped
                failures, failing_since, wait = 0, None, self.RETRY_S
                if unreachable:
                    return  # the next event (or the final status) tries again, with the gap first
                continue
            failures, failing_since, wait = 0, None, self.RETRY_S
            self.lost -= lost
            del self.pending[: len(batch)]

    async def stop(self) -> list[dict]:
        """Stop writing, and answer the rows still to write: the pending events, after a gap
        event if some were lost; the final status writes them in its own transaction. A write
        in flight is waited for (FLUSH_S at most: a store that hangs keeps it, and a write
        landing after the final status is fenced out)."""
        self.stopping = True
        self.wake.set()
        task = self.task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.FLUSH_S)
            except asyncio.TimeoutError:
                log.warning("generation %s: an event write still hangs at the final status", self.generation_id)
            except Exception:  # _drain raises nothing of its own; a bug here must not stop the final status
                log.exception("generation %s: the event writer failed", self.generation_id)
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved (None when it ended normally)
        if self.closed:
            return []
        self.closed = True
        if task is not None and not task.done():
            # The hanging write holds the oldest batch; what follows it is handed over, with a gap
            # for the batch, whose fate is unknown.
            in_flight = min(len(self.pending), self.BATCH)
            self.lost += in_flight
            del self.pending[:in_flight]
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        rows = self._rows(self.pending, self.lost)
        self.pending, self.lost = [], 0
        return rows
