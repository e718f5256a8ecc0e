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
    await asyncio.to_thread(store.update, generation_id, status="running", stage="running")

    async def event(e: ProgressEvent) -> None:
        await asyncio.to_thread(store.update, generation_id, progress=e.progress, stage=e.stage)
        if on_event is not None:
            on_event(e)

    async def plan(storyboard) -> None:
        await asyncio.to_thread(store.update, generation_id, storyboard=storyboard)

    async def scene(result: SceneResult) -> None:
        await asyncio.to_thread(store.checkpoint_scene, generation_id, result)

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
