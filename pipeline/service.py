"""Running a generation as a job: the runner's events, plan and scenes go to the job store as
they happen, so the status endpoint (or `sceneref generate`) always reads the truth, and a
restart resumes from the last checkpointed scene."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from pipeline.jobs import JobStore
from pipeline.runner import GenerationError, ProgressEvent, Services, run_generation
from pipeline.schemas import SceneResult
from pipeline.settings import PipelineSettings

log = logging.getLogger("sceneref.service")


async def execute_job(
    store: JobStore,
    generation_id: str,
    services: Services,
    settings: PipelineSettings,
    *,
    reference_image: bytes | None = None,
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> list[SceneResult] | None:
    """Run or resume the stored job; record completion or a user-facing failure reason.
    Returns the scenes, or None when the generation failed (the reason is in the store)."""
    record = store.get(generation_id)
    if record is None:
        raise KeyError(generation_id)
    request = record.generation_request()
    completed = await asyncio.to_thread(store.scenes, generation_id)
    await asyncio.to_thread(store.update, generation_id, status="running", stage="running", clear_error=True)
    progress = _LatestWriter(store, generation_id)

    async def event(e: ProgressEvent) -> None:
        progress.push(e)
        if on_event is not None:
            on_event(e)

    async def plan(storyboard) -> None:
        await asyncio.to_thread(store.update, generation_id, storyboard=storyboard)

    async def scene(result: SceneResult) -> None:
        await asyncio.to_thread(store.checkpoint_scene, generation_id, result)

    try:
        try:
            scenes = await run_generation(
                generation_id,
                request,
                services,
                settings,
                reference_image=reference_image,
                storyboard=record.storyboard,
                completed=completed,
                on_event=event,
                on_plan=plan,
                on_scene=scene,
            )
        finally:
            await progress.flush()  # before the final status, which must not be overwritten
    except GenerationError as exc:
        log.error("generation %s failed: %s", generation_id, exc)
        await asyncio.to_thread(store.update, generation_id, status="failed", stage="failed", error=str(exc))
        return None
    except Exception as exc:  # a bug must still end the job visibly, with finished scenes kept
        log.exception("generation %s crashed", generation_id)
        await asyncio.to_thread(
            store.update, generation_id, status="failed", stage="failed",
            error=f"internal error ({type(exc).__name__}); finished scenes are kept",
        )
        return None
    await asyncio.to_thread(store.update, generation_id, status="completed", progress=100, stage="completed")
    return scenes


class _LatestWriter:
    """Progress writes off the critical path: the runner never waits for the database between
    scenes; only the newest event is written, one write at a time. Checkpoints stay awaited."""

    def __init__(self, store: JobStore, generation_id: str):
        self.store, self.generation_id = store, generation_id
        self.latest: ProgressEvent | None = None
        self.task: asyncio.Task | None = None

    def push(self, event: ProgressEvent) -> None:
        self.latest = event
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self.latest is not None:
            event, self.latest = self.latest, None
            await asyncio.to_thread(self.store.update, self.generation_id, progress=event.progress, stage=event.stage)

    async def flush(self) -> None:
        if self.task is not None:
            await self.task
