"""The job worker: what claims jobs from the job store and runs them, in an ingress replica and
in the CLI alike. No Serve here; the ingress starts one per replica and only routes HTTP.

Three loops, each for a reason:
- claim: take claimable jobs (new, or whose runner's lease expired) while this worker has room
  (`max_running_per_replica`), waking at once on a submission (`wake()`) or a finished job, else
  every `poll_s` with jitter, so replicas do not poll the store in step;
- cancel watch: one query every CANCEL_WATCH_S finds the running jobs whose owner asked to
  cancel them on another replica, and stops them here;
- retention: the sweep of finished generations past their retention, spread out across replicas.

Every run is a task the worker keeps and observes: what it raised is logged, never left for
asyncio to report when the task is collected. `stop()` cancels the loops and the running jobs,
which release their leases, so another replica resumes them at once instead of after the lease.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from typing import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.aio import observe
from pipeline.jobs.leases import Lease
from pipeline.jobs.retention import RetentionSettings, sweep
from pipeline.jobs.run import CANCEL_POLL_S, execute_job
from pipeline.jobs.store import JobStore
from pipeline.runner import ProgressEvent, Services
from pipeline.settings import PipelineSettings

log = logging.getLogger("sceneref.worker")

CANCEL_WATCH_S = 2.0  # how often the worker looks for cancel requests of the jobs it runs (one query)


class JobSettings(BaseModel):
    """How workers share the jobs: each claims unfinished jobs from the job store with a lease it
    renews while it runs them, so any worker takes over a job whose runner died."""

    model_config = ConfigDict(extra="forbid")

    run_jobs: bool = Field(True, description="claim and run jobs in this app's ingress replicas")
    lease_s: float = Field(30.0, ge=3, description="a runner that stops renewing loses its job after this long")
    poll_s: float = Field(2.0, gt=0, description="how often an idle replica looks for claimable jobs")
    max_running_per_replica: int = Field(32, ge=1, description="jobs one ingress replica runs at once")
    store_outage_s: float = Field(
        120.0, gt=0,
        description="how long a running job waits out a job store it cannot reach (checkpoints, final status) "
        "before it ends failed as transient (resumable); at least lease_s",
    )

    @model_validator(mode="after")
    def _outage_outlasts_the_lease(self) -> "JobSettings":
        """Shorter than the lease, a store restart would fail jobs that the lease keeps safe."""
        if self.store_outage_s < self.lease_s:
            raise ValueError(f"jobs.store_outage_s ({self.store_outage_s:g}) must be at least jobs.lease_s ({self.lease_s:g})")
        return self


Finished = Callable[[str], Awaitable[None]]
"""Called with a generation id once its run ended (the ingress counts final statuses with it)."""


class JobWorker:
    def __init__(
        self,
        store: JobStore,
        services: Services,
        settings: PipelineSettings,
        jobs: JobSettings,
        *,
        holder: str,
        retention: RetentionSettings | None = None,
        artifacts=None,
        traces=None,
        on_finished: Finished | None = None,
        cancel_watch_s: float = CANCEL_WATCH_S,
    ):
        self.store, self.services, self.settings, self.jobs = store, services, settings, jobs
        self.holder, self.retention, self.on_finished = holder, retention, on_finished
        self.artifacts, self.traces = artifacts, traces
        self.cancel_watch_s = cancel_watch_s
        self.tasks: dict[str, asyncio.Task] = {}  # generation id -> its run, while it runs here
        self.background: set[asyncio.Task] = set()  # follow-ups of ended runs, kept until they end
        self._wake = asyncio.Event()
        self.loops: list[asyncio.Task] = []

    @property
    def running(self) -> int:
        return len(self.tasks)

    def start(self) -> None:
        """Start the loops on the running event loop: retention when configured, claiming and
        the cancel watch when this worker runs jobs."""
        loop = asyncio.get_event_loop()
        if self.retention is not None:
            self.loops.append(loop.create_task(self._retention_loop()))
        if self.jobs.run_jobs:
            self.loops.append(loop.create_task(self._claim_loop()))
            self.loops.append(loop.create_task(self._cancel_watch()))

    def wake(self) -> None:
        """A job may be claimable now (a submission, a resume): look at once, not at the next poll."""
        self._wake.set()

    def cancel_local(self, generation_id: str) -> asyncio.Task | None:
        """Stop the run of `generation_id` if it runs here, and answer its task (to await it:
        awaiting with asyncio.wait never cancels it again); None when it does not run here."""
        task = self.tasks.get(generation_id)
        if task is not None:
            task.cancel()
        return task

    def claim(self, generation_id: str) -> Lease | None:
        """Claim `generation_id` for `run` (the CLI's one job); None when it cannot be claimed
        (finished, or held under a live lease). Not in a thread on purpose: a cancellation
        (Ctrl-C) cannot land between the claim and the run, which would leave the job held by
        nobody until its lease expired."""
        return self.store.claim(self.holder, self.jobs.lease_s, generation_id=generation_id)

    async def run(self, lease: Lease, *, on_event: Callable[[ProgressEvent], None] | None = None) -> None:
        """Run the claimed job here to its end, like any job of the claim loop. A cancellation of
        the caller stops the run, which ends the job `cancelled` (if its owner asked) or releases
        it, and then goes on. Without the cancel watch, the run's own lease keeper looks at the
        cancel flag every CANCEL_POLL_S."""
        await self._start(lease, on_event=on_event, cancel_poll_s=CANCEL_POLL_S)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming, and stop the running jobs, which release their leases so another
        worker resumes them at once instead of after the lease (waited for `timeout_s` at most)."""
        for task in self.loops:
            task.cancel()
        running = list(self.tasks.values())
        for task in running:
            task.cancel()
        waiting = [*self.loops, *running]  # the loops end at their next await: wait for them too
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)

    # --- the loops ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Claim claimable jobs while this worker has room; sleep until a submission or a finished
        job wakes it, or `poll_s` (with jitter) passes."""
        jobs = self.jobs
        while True:
            self._wake.clear()  # before claiming: a submission during the claim wakes the next round
            try:
                while len(self.tasks) < jobs.max_running_per_replica:
                    lease = await asyncio.to_thread(self.store.claim, self.holder, jobs.lease_s)
                    if lease is None:
                        break
                    self._start(lease)
            except Exception:  # the database is down or locked: try again next tick
                log.exception("claiming jobs failed; retrying in %.1f s", jobs.poll_s)
            try:
                await asyncio.wait_for(self._wake.wait(), jobs.poll_s * random.uniform(0.8, 1.2))
            except asyncio.TimeoutError:
                pass

    async def _cancel_watch(self) -> None:
        """Stop the jobs of this worker whose owner asked to cancel them on another replica: one
        query for all of them every `cancel_watch_s` (each job's own lease keeper only looks at
        its renewals)."""
        while True:
            await asyncio.sleep(self.cancel_watch_s)
            if not self.tasks:
                continue
            try:
                for generation_id in await asyncio.to_thread(self.store.cancel_requested_among, list(self.tasks)):
                    self.cancel_local(generation_id)
            except Exception:
                log.exception("looking for cancel requests failed")

    async def _retention_loop(self) -> None:
        settings = self.retention
        await asyncio.sleep(random.uniform(0, min(60.0, settings.interval_s)))  # replicas spread out
        while True:
            try:
                removed = await asyncio.to_thread(sweep, self.store, self.artifacts, self.traces, settings)
                if removed:
                    log.info("retention removed %d generations", len(removed))
            except Exception:
                log.exception("retention sweep failed; next try in %.0f s", settings.interval_s)
            await asyncio.sleep(settings.interval_s)

    # --- one run ------------------------------------------------------------------------------

    def _start(
        self, lease: Lease, *, on_event: Callable[[ProgressEvent], None] | None = None, cancel_poll_s: float | None = None,
    ) -> asyncio.Task:
        generation_id = lease.generation_id
        log.info("%s runs generation %s (lease %d)", self.holder, generation_id, lease.token)
        task = asyncio.get_running_loop().create_task(
            execute_job(
                self.store, lease, self.services, self.settings, lease_s=self.jobs.lease_s, on_event=on_event,
                # The cancel watch looks more often, for all jobs at once.
                cancel_poll_s=self.jobs.lease_s / 3 if cancel_poll_s is None else cancel_poll_s,
                store_outage_s=self.jobs.store_outage_s,
            )
        )
        self.tasks[generation_id] = task
        task.add_done_callback(functools.partial(self._ended, generation_id))
        return task

    def _ended(self, generation_id: str, task: asyncio.Task) -> None:
        """A run ended: make room, and hand it to `on_finished`. Its outcome is retrieved here, so
        nothing it raised goes unseen; the follow-up task is kept referenced until it ends (the
        loop holds tasks only weakly) and observed too."""
        self.tasks.pop(generation_id, None)
        self._wake.set()
        observe(task, log, f"generation {generation_id}: its run raised")
        if self.on_finished is not None:
            follow_up = asyncio.ensure_future(self.on_finished(generation_id))
            self.background.add(follow_up)
            follow_up.add_done_callback(self.background.discard)
            follow_up.add_done_callback(functools.partial(observe, log=log, what="a follow-up of an ended run failed"))
