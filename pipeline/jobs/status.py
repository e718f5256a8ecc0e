"""The HTTP status shape (`GET /api/status/{id}`, also `sceneref generate --json`), built from
what the job store holds.

It lives beside the store rather than in it (`pipeline.jobs.store`), so the database layer only
stores and loads jobs and scenes, and the shape the clients see is written in one place that
both the ingress and the CLI use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from datetime import datetime, timezone

from pipeline.costs import combine, generation_timing
from pipeline.schemas import AdvancedImageSettings, GenerationStatus, SceneResult, StoryboardPlan

if TYPE_CHECKING:
    from pipeline.jobs.records import JobRecord


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
        if plan is not None and plan.markers:
            entry["consistency_markers"] = plan.markers
        if result:
            entry.update(
                enhanced_prompt=result.enhanced_prompt,
                reference_image_url=url_for(result.reference_image_key),
                quality_score=result.quality_score,
                prompt_score=result.prompt_score,
                below_threshold=result.below_threshold,
                user_provided=result.user_provided,
            )
            if result.consistency_score is not None:  # additive (consistency): only where it was measured
                entry["consistency_score"] = result.consistency_score
            if result.cost is not None:  # additive (cost): absent for scenes stored before it
                entry["cost"] = result.cost.model_dump(mode="json")
            if result.timing is not None:
                entry["timing"] = result.timing.model_dump(mode="json")
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
            consistency_sheet=next((p.sheet for p in record.storyboard or [] if p.sheet is not None), None),
        ),
        error=record.error,
        offline=record.offline,
        **_totals(record, scenes),
    )


def _totals(record: JobRecord, scenes: Sequence[SceneResult]) -> dict[str, Any]:
    """The generation's cost and timing: the storyboard call plus every finished scene. Work
    of an earlier run that a resume redid (the enhancement of scenes that were not finished) is
    not in any stored scene, so it is not counted."""
    planning = next((p.planning for p in record.storyboard or [] if p.planning is not None), None)
    end = record.finished_at or datetime.now(timezone.utc)
    elapsed = max(0.0, (end - record.created_at).total_seconds()) if record.created_at else None
    return {
        "cost": combine([planning.cost if planning else None, *(s.cost for s in scenes)]),
        "timing": generation_timing(planning, [s.timing for s in scenes], round(elapsed, 3) if elapsed is not None else None),
    }


__all__ = ["to_status"]
