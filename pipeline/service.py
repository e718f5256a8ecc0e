"""Running a claimed job: the runner's plan and scenes go to the job store as they happen, fenced
by the job's lease, so the status endpoint (or `sceneref generate`) always reads the truth and
any runner resumes from the last checkpointed scene.

The lifecycle, and why each rule is there:
- The lease is renewed in the background every `lease_s / 3`; losing it (someone took the job
  over after we stalled) stops the run at once and nothing more is written: the new holder owns
  the job. The same loop notices a cancel request from another replica and stops the run.
- Progress writes are best effort (a `database is locked` must never fail a generation);
  checkpoints and the final status are fenced and retried on transient database errors.
- Every progress event goes to the job's event log (what the SSE stream of any replica reads),
  batched in the background so the runner never waits for the database, fenced like any write
  and flushed before the final status, whose own event the store writes with it.
- A job whose scenes are all checkpointed is `completed`, whatever fails after (trace cleanup,
  a progress write): the user has every image.
- Cancelled from outside (Ctrl-C, a replica shutting down): the job ends `cancelled` if its
  owner asked, else the lease is released so any runner resumes it at once; the final write is
  shielded from the cancellation, which is then re-raised. A job never stays `running` with a
  live lease that nobody renews.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from sqlalchemy.exc import OperationalError

from pipeline.jobs import JobNotFound, JobStore, Lease, LeaseLost, event_row
from pipeline.runner import GenerationError, ProgressEvent, Services, run_generation
from pipeline.schemas import SceneResult
from pipeline.settings import PipelineSettings

log = logging.getLogger("sceneref.service")

# Waits between attempts of a write that must land (checkpoint, final status) on a transient
# database error; about 4 s in all, well inside any sensible lease.
RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.5)
# Upper bound between two looks at the job's cancel flag when the caller gives none. Each look is
# a query per running job: a replica running dozens of jobs passes a longer one (the ingress
# looks at every renewal, lease_s / 3, and cancels jobs it runs itself at once).
CANCEL_POLL_S = 2.0


async def _retrying(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OperationalError as exc:
            if delay is None:
                raise
            log.warning("%s failed (%s); retrying in %.1f s", getattr(fn, "__name__", fn), exc.orig, delay)
            await asyncio.sleep(delay)


async def _shielded(work: Awaitable[Any]) -> Any:
    """Run `work` to its end even if we are cancelled meanwhile; re-raise the cancellation after."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                result = task.result()
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def execute_job(
    store: JobStore,
    lease: Lease,
    services: Services,
    settings: PipelineSettings,
    *,
    lease_s: float = 30.0,
    on_event: Callable[[ProgressEvent], None] | None = None,
    cancel_poll_s: float = CANCEL_POLL_S,
) -> list[SceneResult] | None:
    """Run or resume the job held by `lease` and record how it ended.

    Returns the scenes when the job completed; None when it failed or was cancelled (the store
    says which, and why) or when the lease was lost (the new holder decides).
    """
    gid = lease.generation_id
    try:
        record = await _retrying(store.get, gid)
        if record is None:
            raise JobNotFound(gid)
        completed = await _retrying(store.scenes, gid)
        await _retrying(store.update, gid, stage="running", clear_error=True, lease=lease)
    except (LeaseLost, JobNotFound) as exc:
        log.warning("generation %s not started: %s", gid, exc)
        return None
    except asyncio.CancelledError:  # stopped before the run began: never leave it held by nobody
        await _shielded(_end_interrupted(_Job(store, lease, None, [])))
        raise
    job = _Job(store, lease, record.storyboard, completed)
    progress = _EventWriter(store, gid, lease)

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
            await progress.stop()
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling() > 0:  # we were cancelled, not just the run
            await _shielded(_end_interrupted(job))
            raise
        if keeper.reason == "lost":
            return None
        return await _shielded(job.end("cancelled"))
    except LeaseLost:
        log.warning("generation %s: lease lost, stopping without further writes", gid)
        return None
    except GenerationError as exc:
        log.error("generation %s failed: %s", gid, exc)
        reason = str(exc)
        if getattr(exc, "retryable", False):
            reason += " (a transient error: the job can be resumed)"
        return await _shielded(job.end("failed", reason))
    except Exception as exc:  # a bug must still end the job visibly, with finished scenes kept
        log.exception("generation %s crashed", gid)
        return await _shielded(job.end("failed", f"internal error ({type(exc).__name__}); finished scenes are kept"))
    await _shielded(job.end("completed"))
    return scenes


async def _end_interrupted(job: "_Job") -> None:
    """Stopped from outside: cancelled if the owner asked, else left for anyone to resume."""
    try:
        if job.all_checkpointed() or await _retrying(job.store.cancel_requested, job.lease.generation_id):
            await job.end("cancelled")
        else:
            await _retrying(job.store.release, job.lease)
            log.info("generation %s released unfinished; any runner may resume it", job.lease.generation_id)
    except (LeaseLost, JobNotFound):
        pass


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

    def __init__(self, store: JobStore, lease: Lease, storyboard: list | None, completed: list[SceneResult]):
        self.store, self.lease = store, lease
        self.total = len(storyboard) if storyboard else None
        self.checkpointed = {s.scene_number for s in completed}

    def all_checkpointed(self) -> bool:
        return self.total is not None and len(self.checkpointed) >= self.total

    async def plan(self, storyboard: list) -> None:
        await _retrying(self.store.update, self.lease.generation_id, storyboard=storyboard, lease=self.lease)
        self.total = len(storyboard)

    async def scene(self, result: SceneResult) -> None:
        await _retrying(self.store.checkpoint_scene, self.lease.generation_id, result, self.lease)
        self.checkpointed.add(result.scene_number)

    async def end(self, status: str, error: str | None = None) -> list[SceneResult] | None:
        """The final, fenced status; a job with every scene checkpointed is `completed`."""
        if self.all_checkpointed():
            status, error = "completed", None
        try:
            await _retrying(self.store.finish, self.lease, status, error=error)
        except (LeaseLost, JobNotFound) as exc:
            log.warning("generation %s: final status %s not written: %s", self.lease.generation_id, status, exc)
            return None
        if status != "completed":
            return None
        return await _retrying(self.store.scenes, self.lease.generation_id)


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
                log.warning("generation %s: lease renewal failed (%s)", self.lease.generation_id, exc)

    def _stop(self, reason: str) -> None:
        self.reason = reason
        self.run_future.cancel()


class _EventWriter:
    """Events to the job's log off the critical path: the runner never waits for the database.
    One write at a time takes everything pending (up to BATCH events) in one fenced transaction
    that also moves the job's progress and stage to the newest event's, so a busy database gets
    fewer, larger writes and the log keeps the runner's order. Best effort: a failing write is
    retried a few times, then its events are dropped with a warning (the job goes on). A runner
    that lost its lease, or whose job already has its final status, writes nothing."""

    BATCH = 200
    ATTEMPTS = 3
    RETRY_S = 0.5
    MAX_PENDING = 5000  # a database down for long must not grow a replica's memory without bound
    FLUSH_S = 5.0  # at the end, how long the final status waits for pending events

    def __init__(self, store: JobStore, generation_id: str, lease: Lease):
        self.store, self.generation_id, self.lease = store, generation_id, lease
        self.pending: list[ProgressEvent] = []
        self.task: asyncio.Task | None = None
        self.closed = False
        self.dropped = 0

    def push(self, event: ProgressEvent) -> None:
        if self.closed:
            return
        if len(self.pending) >= self.MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(event)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        failures = 0
        while self.pending and not self.closed:
            batch = self.pending[: self.BATCH]
            rows = [
                event_row(e.kind or e.stage, e.stage, e.progress, e.message, scene=e.scene, data=e.data, at=e.at)
                for e in batch
            ]
            try:
                await asyncio.to_thread(
                    self.store.append_events, self.generation_id, rows, self.lease,
                    progress=batch[-1].progress, stage=batch[-1].stage,
                )
            except (LeaseLost, JobNotFound) as exc:
                log.warning("generation %s: events not written: %s", self.generation_id, exc)
                self.closed, self.pending = True, []
                return
            except Exception as exc:
                failures += 1
                if failures < self.ATTEMPTS:
                    log.warning("generation %s: event write failed (%s); retrying", self.generation_id, exc)
                    await asyncio.sleep(self.RETRY_S)
                    continue
                log.warning("generation %s: %d events dropped after %d failed writes (%s)",
                            self.generation_id, len(batch), failures, exc)
            failures = 0
            del self.pending[: len(batch)]

    async def stop(self) -> None:
        """Write what is pending (so the log holds every event before the final status's),
        waiting at most FLUSH_S; then stop writing. A write still landing after that is fenced
        out by the final status."""
        if self.task is not None and not self.task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.task), self.FLUSH_S)
            except asyncio.TimeoutError:
                log.warning("generation %s: %d events not written before the final status",
                            self.generation_id, len(self.pending))
            except Exception:
                pass
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.dropped:
            log.warning("generation %s: %d events dropped (too many pending)", self.generation_id, self.dropped)
