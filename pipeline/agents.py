"""The two-agent prompt enhancement loop.

Agent 1 (Cinematographer) rewrites the scene prompt; agent 2 (Prompt Engineer) scores the
rewrite on five dimensions and critiques it; the critique goes back to agent 1. The loop stops
when the overall score reaches the approval score (85) or after `max_iterations`. The overall
is computed here from the dimension scores (an overall the LLM reports is ignored), and the
best-scored prompt is kept, not the last one.

Consistency markers: a rewrite that drops one of the scene's markers is refused
before agent 2 sees it. It counts as a failed iteration of agent 1 (recorded with the markers
it dropped) and the loop goes on, telling agent 1 which markers to restore; a refused rewrite
is never the final prompt.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from pipeline.consistency import missing_markers
from pipeline.providers.base import ChatModel, ProviderError
from pipeline.schemas import (
    CinematographerOutput,
    DimensionScores,
    EnhancementResult,
    IterationRecord,
    PromptReview,
    ScenePlan,
)
from pipeline.settings import DimensionWeights, EnhancementSettings
from pipeline.structured import InvalidOutputError, ask_json

log = logging.getLogger("sceneref.agents")

CINEMATOGRAPHER = """You are a Cinematographer writing prompts for an image generation model.
Rewrite `scene_prompt` (one scene of the story in `story_prompt`) into one detailed image
prompt. Specify: camera angle and shot size; lens focal length and depth of field; lighting
(direction, quality, colour temperature in kelvin); composition (framing, rule of thirds,
leading lines, negative space); and concrete subject detail (materials, textures, colours,
props, action). Keep the product and story faithful to the original. `markers` are the
film's consistency markers for this scene (product, characters, setting, style): copy each
one into your prompt word for word, unchanged; a rewrite that drops or alters one is refused.
When `critique` and `improvements` are given, they review your `previous_prompt`: fix every point.
Reply with only a JSON object: {"enhanced_prompt": "..."}"""

PROMPT_ENGINEER = """You are a Prompt Engineer reviewing image-generation prompts for a
commercial video. Score `enhanced_prompt` from 0 to 100 on five dimensions:
completeness (all story elements of `scene_prompt` present), specificity (concrete, visual,
unambiguous detail), professionalism (commercial-grade wording, no filler), cinematography
(camera, lens, lighting, composition), brand_alignment (faithful to the product and tone of
`story_prompt`). Then write a short critique and a list of concrete improvements.
Reply with only a JSON object:
{"scores": {"completeness": 0-100, "specificity": 0-100, "professionalism": 0-100,
"cinematography": 0-100, "brand_alignment": 0-100}, "critique": "...", "improvements": ["..."]}"""


def failed_agent(record: IterationRecord) -> str | None:
    """Which agent ended this iteration with an error: "cinematographer" (agent 1 wrote no
    prompt, so the record has none), "prompt_engineer" (agent 1's prompt is there, its review
    failed), or None for a reviewed iteration. Derived from the record itself, so the trace
    writer and any later reader agree without a second field to keep in sync."""
    if not record.error:
        return None
    if record.dropped_markers:  # agent 1's rewrite was refused before agent 2 saw it
        return "cinematographer"
    return "prompt_engineer" if record.enhanced_prompt else "cinematographer"


def overall_score(scores: DimensionScores, weights: DimensionWeights) -> float:
    """Weighted average of the five dimensions (weights normalised to sum to one)."""
    w = weights.as_dict()
    total = sum(w.values())
    return round(sum(getattr(scores, name) * weight for name, weight in w.items()) / total, 2)


async def enhance_scene(
    chat: ChatModel,
    scene: ScenePlan,
    story_prompt: str,
    *,
    max_iterations: int,
    settings: EnhancementSettings,
    retries: int,
    on_iteration: Callable[[IterationRecord], Awaitable[None]] | None = None,
) -> EnhancementResult:
    """`on_iteration` hears each iteration as soon as it is decided (live progress), failed and
    refused ones included."""
    iterations: list[IterationRecord] = []

    async def keep(iteration: IterationRecord) -> None:
        iterations.append(iteration)
        if on_iteration is not None:
            await on_iteration(iteration)

    best: IterationRecord | None = None
    latest_prompt: str | None = None  # the last rewrite that kept every marker
    previous_prompt: str | None = None  # what agent 1 wrote last, refused or not (it is told why)
    critique: str | None = None
    improvements: list[str] = []
    stop_reason = f"iteration limit {max_iterations} reached"

    for i in range(1, max_iterations + 1):
        try:
            rewrite = await ask_json(
                chat,
                task="cinematographer",
                system=CINEMATOGRAPHER,
                inputs={
                    "scene_prompt": scene.prompt,
                    "story_prompt": story_prompt,
                    "markers": scene.markers,
                    "scene_number": scene.scene_number,
                    "iteration": i,
                    "previous_prompt": previous_prompt,
                    "critique": critique,
                    "improvements": improvements,
                },
                schema=CinematographerOutput,
                retries=retries,
            )
            if not rewrite.enhanced_prompt.strip():  # a blank rewrite is no rewrite (see failed_agent)
                raise InvalidOutputError("cinematographer", 1, ["enhanced_prompt is blank"])
        except (InvalidOutputError, ProviderError) as exc:
            stop_reason = f"agent 1 failed at iteration {i}: {exc}"
            # No prompt: agent 1 wrote none this iteration. Carrying the previous one here would
            # make the trace show it as a new rewrite (and blame agent 2 for the error).
            await keep(IterationRecord(iteration=i, enhanced_prompt="", error=str(exc)))
            break
        candidate = rewrite.enhanced_prompt.strip()
        dropped = missing_markers(candidate, scene.markers)
        if dropped:
            await keep(
                IterationRecord(
                    iteration=i, enhanced_prompt=candidate, dropped_markers=dropped,
                    error=f"rewrite refused: it dropped {len(dropped)} consistency marker(s): " + "; ".join(dropped),
                )
            )
            stop_reason = f"iteration limit {max_iterations} reached"
            previous_prompt = candidate
            critique = "Your rewrite dropped consistency markers. Copy each one word for word: " + "; ".join(dropped)
            improvements = [f"Restore verbatim: {marker}" for marker in dropped]
            continue
        latest_prompt = previous_prompt = candidate

        try:
            review = await ask_json(
                chat,
                task="prompt_engineer",
                system=PROMPT_ENGINEER,
                inputs={
                    "scene_prompt": scene.prompt,
                    "story_prompt": story_prompt,
                    "markers": scene.markers,
                    "enhanced_prompt": latest_prompt,
                    "iteration": i,
                },
                schema=PromptReview,
                retries=retries,
            )
        except (InvalidOutputError, ProviderError) as exc:
            stop_reason = f"agent 2 failed at iteration {i}: {exc}"
            await keep(IterationRecord(iteration=i, enhanced_prompt=latest_prompt, error=str(exc)))
            break

        record = IterationRecord(
            iteration=i,
            enhanced_prompt=latest_prompt,
            scores=review.scores,
            overall=overall_score(review.scores, settings.weights),
            critique=review.critique,
            improvements=review.improvements,
        )
        await keep(record)
        if best is None or record.overall > best.overall:
            best = record
        if record.overall >= settings.approval_score:
            stop_reason = f"approved at iteration {i}: {record.overall} >= {settings.approval_score}"
            break
        critique, improvements = review.critique, review.improvements

    scored = [r for r in iterations if r.overall is not None]
    if best is not None:
        final_prompt = best.enhanced_prompt
    else:
        # No rewrite was ever scored: an unscored rewrite still beats the raw scene prompt.
        final_prompt = latest_prompt or scene.prompt
        stop_reason += "; no scored prompt, kept " + ("the last rewrite" if latest_prompt else "the original")
    refused = sum(1 for r in iterations if r.dropped_markers)
    if refused:
        stop_reason += f"; {refused} rewrite(s) refused for dropping consistency markers"
    if best is not None and best is not scored[-1]:
        stop_reason += f"; kept iteration {best.iteration} (best score {best.overall})"
    log.info("scene %d: %s", scene.scene_number, stop_reason)
    return EnhancementResult(
        original_prompt=scene.prompt,
        final_prompt=final_prompt,
        initial_scores=scored[0].scores if scored else None,
        initial_overall=scored[0].overall if scored else None,
        final_scores=best.scores if best else None,
        final_overall=best.overall if best else None,
        total_iterations=len(iterations),
        approved=best is not None and best.overall >= settings.approval_score,
        stop_reason=stop_reason,
        iterations=iterations,
    )
