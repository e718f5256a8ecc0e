"""Storyboard planning: how many scenes a duration gets, and one scene prompt each.

Scene count rule (the earlier system's, so its clients see the same storyboards):
up to 12 s -> 3 scenes, up to 20 s -> 4, up to 30 s -> 5, longer -> max(5, round(T / 6)).
Durations are whole seconds, as equal as possible (longer scenes first), summing to T;
for 9-60 s every scene lands in 3-7 s.
"""

from __future__ import annotations

from pipeline.providers import ChatModel
from pipeline.schemas import ScenePlan, StoryboardOutput
from pipeline.structured import ask_json

SYSTEM = """You are a storyboard planner for short video ads and product stories.
Split the user's prompt into exactly `scene_count` consecutive scenes that tell one story
from opening to closing. The input JSON gives `prompt`, `scene_count` and `durations`
(seconds per scene). For each scene write one vivid, self-contained image description of
what the camera sees (subject, setting, action, mood), consistent in product, characters and
style with the other scenes. Reply with only a JSON object:
{"scenes": [{"description": "..."}, ...]} with exactly `scene_count` items."""


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


async def plan_storyboard(chat: ChatModel, prompt: str, target_duration: int, *, retries: int) -> list[ScenePlan]:
    durations = scene_durations(target_duration)

    def exact_count(output: StoryboardOutput) -> None:
        if len(output.scenes) != len(durations):
            raise ValueError(f"expected exactly {len(durations)} scenes, got {len(output.scenes)}")

    output = await ask_json(
        chat,
        task="storyboard",
        system=SYSTEM,
        inputs={"prompt": prompt, "scene_count": len(durations), "durations": durations},
        schema=StoryboardOutput,
        retries=retries,
        check=exact_count,
    )
    return [
        ScenePlan(scene_number=i + 1, duration=duration, prompt=scene.description.strip())
        for i, (scene, duration) in enumerate(zip(output.scenes, durations))
    ]
