"""The one entry point for a generation, shared by the CLI and the Serve ingress.

storyboard -> enhance every scene concurrently -> for each scene in order (chained on the
previous scene's selected image): variations concurrently -> score -> rank -> select ->
checkpoint -> traces. Progress is reported through `on_event`; each scene is handed to
`on_scene` as soon as it is selected, so a crash never loses a finished scene and a rerun with
`completed=` resumes at the next one.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from PIL import Image

from pipeline.agents import enhance_scene
from pipeline.artifacts import ArtifactStore
from pipeline.providers import ChatModel, ImageProvider, ProviderError
from pipeline.schemas import EnhancementResult, GenerationRequest, ScenePlan, SceneResult, VariationResult
from pipeline.scoring import ScoringClient, rank, weighted_overall
from pipeline.settings import PipelineSettings
from pipeline.storyboard import plan_storyboard
from pipeline.traces import TraceWriter

log = logging.getLogger("sceneref.runner")

# Progress budget: planning 0-5, enhancement 5-25, scenes share 25-100.
_PLANNED, _ENHANCED = 5, 25


class GenerationError(RuntimeError):
    """The generation cannot go on; the message says why (shown as the status's `error`)."""


@dataclass
class ProgressEvent:
    stage: str  # planning | enhancing | generating | scoring | scene_completed | completed
    progress: int
    message: str
    scene: int | None = None
    total_scenes: int | None = None


@dataclass
class Services:
    chat: ChatModel
    images: ImageProvider
    scoring: ScoringClient
    artifacts: ArtifactStore
    traces: Any = None  # an object store for the trace tree; None: files under settings.traces.root


Callback = Callable[[Any], Awaitable[None] | None] | None


async def _call(callback: Callback, value: Any) -> None:
    if callback is not None:
        result = callback(value)
        if inspect.isawaitable(result):
            await result


def _as_png(data: bytes) -> bytes:
    """Providers may answer PNG, JPEG or WEBP; keep PNG everywhere. Raises on undecodable data."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format == "PNG":
            return data
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return out.getvalue()


async def run_generation(
    generation_id: str,
    request: GenerationRequest,
    services: Services,
    settings: PipelineSettings,
    *,
    reference_image: bytes | None = None,
    reference_key: str | None = None,
    storyboard: list[ScenePlan] | None = None,
    completed: list[SceneResult] = (),
    on_event: Callback = None,
    on_plan: Callback = None,
    on_scene: Callback = None,
) -> list[SceneResult]:
    """Run (or resume) one generation and return its scenes in order.

    `reference_image` (PNG bytes) becomes scene 1 unchanged; `reference_key` names such an image
    already in the artifact store (the job's persisted upload), used as it is, never re-stored. `storyboard` and `completed`
    come from a checkpoint when resuming. Raises GenerationError with a user-facing reason.
    """
    traces = TraceWriter(services.traces if services.traces is not None else settings.traces.root, generation_id)
    retries = settings.llm.invalid_output_retries

    reached = 0  # progress never goes backwards, also when a resumed job re-enters early stages

    async def emit(stage: str, progress: int, message: str, scene: int | None = None) -> None:
        nonlocal reached
        reached = max(reached, progress)
        total = len(storyboard) if storyboard else None
        await _call(on_event, ProgressEvent(stage, reached, message, scene, total))

    if storyboard is None:
        await emit("planning", 0, "planning the storyboard")
        try:
            storyboard = await plan_storyboard(services.chat, request.prompt, request.target_duration, retries=retries)
        except Exception as exc:
            raise GenerationError(f"storyboard planning failed: {exc}") from exc
        await _call(on_plan, storyboard)
    results: dict[int, SceneResult] = {s.scene_number: s for s in completed}
    if results:
        reached = _ENHANCED + (100 - _ENHANCED) * len(results) // len(storyboard)
    await emit("planning", _PLANNED, f"storyboard has {len(storyboard)} scenes")

    if (reference_image is not None or reference_key is not None) and 1 not in results:
        results[1] = await _user_scene(generation_id, storyboard[0], reference_image, reference_key, services, traces)
        await _call(on_scene, results[1])

    pending = [scene for scene in storyboard if scene.scene_number not in results]
    enhanced = await _enhance_all(pending, request, services, settings, traces, emit)

    for scene in pending:
        n, total = scene.scene_number, len(storyboard)
        previous = results.get(n - 1)
        reference = services.artifacts.get(previous.reference_image_key) if previous else None
        result = await _generate_scene(
            generation_id, scene, total, enhanced[n], reference, request, services, settings, traces, emit
        )
        results[n] = result
        await _call(on_scene, result)
        done = sum(1 for s in storyboard if s.scene_number in results)
        await emit("scene_completed", _ENHANCED + (100 - _ENHANCED) * done // total, f"scene {n} of {total} selected", n)

    if not settings.traces.keep:
        traces.cleanup()
    await emit("completed", 100, "generation completed")
    return [results[s.scene_number] for s in storyboard]


async def _user_scene(
    generation_id, scene: ScenePlan, image: bytes | None, key: str | None, services: Services, traces: TraceWriter
) -> SceneResult:
    if key is None:
        key = services.artifacts.put(f"{generation_id}/scene_1/user_reference.png", _as_png(image))
    result = SceneResult(
        scene_number=1,
        duration=scene.duration,
        original_prompt=scene.prompt,
        enhanced_prompt=scene.prompt,
        reference_image_key=key,
        user_provided=True,
    )
    traces.original_prompt(1, scene.prompt)
    traces.selected(result, threshold=0)
    return result


async def _enhance_all(pending, request, services, settings, traces, emit) -> dict[int, EnhancementResult]:
    """Enhancement needs no images, so every scene is enhanced at once, up front."""
    if not pending:
        return {}
    finished = 0

    async def one(scene: ScenePlan) -> EnhancementResult:
        nonlocal finished
        traces.original_prompt(scene.scene_number, scene.prompt)
        result = await enhance_scene(
            services.chat,
            scene,
            request.prompt,
            max_iterations=request.advanced_image_max_enhancement_iterations,
            settings=settings.enhancement,
            retries=settings.llm.invalid_output_retries,
        )
        traces.enhancement(scene.scene_number, result)
        finished += 1
        score = f"{result.final_overall:.1f}" if result.final_overall is not None else "unscored"
        await emit(
            "enhancing",
            _PLANNED + (_ENHANCED - _PLANNED) * finished // len(pending),
            f"scene {scene.scene_number} prompt enhanced in {result.total_iterations} iteration(s), score {score}",
            scene.scene_number,
        )
        return result

    results = await asyncio.gather(*(one(scene) for scene in pending))
    return {scene.scene_number: result for scene, result in zip(pending, results)}


async def _generate_scene(
    generation_id: str,
    scene: ScenePlan,
    total: int,
    enhancement: EnhancementResult,
    reference: bytes | None,
    request: GenerationRequest,
    services: Services,
    settings: PipelineSettings,
    traces: TraceWriter,
    emit,
) -> SceneResult:
    n = scene.scene_number
    prompt = enhancement.final_prompt
    count = request.advanced_image_num_variations
    progress = _ENHANCED + (100 - _ENHANCED) * (n - 1) // total
    await emit("generating", progress, f"scene {n}: generating {count} variations", n)

    async def variation(k: int) -> tuple[VariationResult, bytes | None]:
        try:
            image = await services.images.generate(prompt, reference=reference, variation=k)
            data = await asyncio.to_thread(_as_png, image.data)  # a full decode: off the event loop
        except ProviderError as exc:
            log.warning("scene %d variation %d failed: %s", n, k, exc)
            return VariationResult(variation=k, error=str(exc)), None
        except Exception as exc:  # an undecodable image, a client bug: recorded, the scene goes on
            log.warning("scene %d variation %d failed: %r", n, k, exc)
            return VariationResult(variation=k, error=f"{type(exc).__name__}: {exc}"), None
        key = services.artifacts.put(f"{generation_id}/scene_{n}/variation_{k}.png", data)
        traces.image(n, k, data)
        return VariationResult(variation=k, image_key=key, provider_metadata=image.metadata), data

    outcomes = await asyncio.gather(*(variation(k) for k in range(1, count + 1)))
    variations = [v for v, _ in outcomes]
    received = [(v, data) for v, data in outcomes if data is not None]
    if not received:
        reasons = "; ".join(f"variation {v.variation}: {v.error}" for v in variations)
        raise GenerationError(f"scene {n}: no image could be generated ({reasons})")

    await emit("scoring", progress, f"scene {n}: scoring {len(received)} variations", n)
    weights = settings.scoring.weights.as_dict()
    try:
        scores = await services.scoring.score([data for _, data in received], [prompt] * len(received))
        for (v, _), per_scorer in zip(received, scores):
            v.scores = per_scorer
            v.overall = weighted_overall(per_scorer, weights)
    except Exception as exc:
        traces.quality_scores(n, prompt, weights, variations)
        raise GenerationError(f"scene {n}: scoring failed: {exc}") from exc
    best = rank(variations)[0]
    below = best.overall < request.advanced_image_quality_threshold
    if below:
        log.warning(
            "scene %d: best quality score %.2f is below the threshold %.2f; continuing",
            n, best.overall, request.advanced_image_quality_threshold,
        )
    result = SceneResult(
        scene_number=n,
        duration=scene.duration,
        original_prompt=scene.prompt,
        enhanced_prompt=prompt,
        prompt_score=enhancement.final_overall,
        reference_image_key=best.image_key,
        quality_score=best.overall,
        below_threshold=below,
        selected_variation=best.variation,
        variations=variations,
    )
    traces.quality_scores(n, prompt, weights, variations)
    traces.selected(result, request.advanced_image_quality_threshold)
    return result
