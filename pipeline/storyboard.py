"""Storyboard planning: how many scenes a duration gets, and one scene prompt each.

Scene count rule (the earlier system's, so its clients see the same storyboards):
up to 12 s -> 3 scenes, up to 20 s -> 4, up to 30 s -> 5, longer -> max(5, round(T / 6)).
Durations are whole seconds, as equal as possible (longer scenes first), summing to T;
for 9-60 s every scene lands in 3-7 s.
"""

from __future__ import annotations

import logging

from pipeline.consistency import compose_prompt, scene_markers
from pipeline.providers.base import ChatModel
from pipeline.schemas import ScenePlan, StoryboardOutput
from pipeline.structured import ask_json

log = logging.getLogger("sceneref.storyboard")

SYSTEM = """You are a storyboard planner for short video ads and product stories.
Split the user's prompt into exactly `scene_count` consecutive scenes that tell one story
from opening to closing. The input JSON gives `prompt`, `scene_count` and `durations`
(seconds per scene); `image_attached: true` means the user's image is attached: it is the
first scene, so describe what is in it.
First write a consistency sheet for the whole film, so every scene shows the same things:
the product (name, shape, colours, materials, logo placement), each recurring character
with a fixed physical description (age, hair, clothing), the setting, and the visual
style and colour palette. Be concrete and short: these words are repeated in every scene.
Then, for each scene, write one vivid, self-contained image description of what the camera
sees (subject, action, mood) and list the ids of the sheet entries it shows ("product",
"setting", "style", or a character's name). Reply with only a JSON object:
{"consistency": {"product": {"name": "...", "shape": "...", "colours": "...", "materials": "...",
"logo_placement": "..."}, "characters": [{"name": "...", "age": "...", "hair": "...",
"clothing": "..."}], "setting": "...", "style": "..."},
"scenes": [{"description": "...", "markers": ["product", "style"]}, ...]}
with exactly `scene_count` scenes (characters may be an empty list)."""


def scene_count(target_duration: int) -> int:
    if target_duration <= 12:
        return 3
    if target_duration <= 20:
        return 4
    if target_duration <= 30:
        return 5
    return max(5, round(target_duration / 6))


def scene_durations(target_duration: int) -> list[int]:
    count = scene_count(target_duration)
    base, extra = divmod(target_duration, count)
    return [base + 1 if i < extra else base for i in range(count)]


async def plan_storyboard(
    chat: ChatModel,
    prompt: str,
    target_duration: int,
    *,
    retries: int,
    image: bytes | None = None,
    accepts_images: bool = True,
    markers: bool = True,
) -> list[ScenePlan]:
    """Plan the scenes and the consistency sheet. With the user's `image` (PNG), the LLM sees
    it when the configured model `accepts_images`; otherwise the sheet comes from the prompt
    alone and its `source` says so ("prompt-no-vision"). Every scene's prompt is its
    description followed by its markers, verbatim (pipeline.consistency); `markers=False`
    keeps the sheet but leaves the markers out (the evaluation's "without markers" arm)."""
    durations = scene_durations(target_duration)
    use_markers = markers
    send_image = image if image is not None and accepts_images else None

    def exact_count(output: StoryboardOutput) -> None:
        if len(output.scenes) != len(durations):
            raise ValueError(f"expected exactly {len(durations)} scenes, got {len(output.scenes)}")

    output = await ask_json(
        chat,
        task="storyboard",
        system=SYSTEM,
        inputs={
            "prompt": prompt, "scene_count": len(durations), "durations": durations,
            "image_attached": send_image is not None,
        },
        schema=StoryboardOutput,
        retries=retries,
        check=exact_count,
        image=send_image,
    )
    sheet = output.consistency
    if sheet is None:
        log.warning("storyboard: the planner wrote no consistency sheet; scenes carry no markers")
    else:
        source = "prompt" if image is None else ("image" if send_image is not None else "prompt-no-vision")
        sheet = sheet.model_copy(update={"source": source})
    plans = []
    for i, (scene, duration) in enumerate(zip(output.scenes, durations)):
        description = " ".join(scene.description.split())
        markers = scene_markers(sheet, scene.markers) if use_markers else []
        plans.append(
            ScenePlan(
                scene_number=i + 1, duration=duration, prompt=compose_prompt(description, markers),
                description=description, markers=markers, sheet=sheet,
            )
        )
    return plans
