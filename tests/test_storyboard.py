import json

import pytest

from pipeline.storyboard import plan_storyboard, scene_count, scene_durations
from pipeline.structured import InvalidOutputError


@pytest.mark.parametrize(
    "duration,count",
    [(9, 3), (12, 3), (13, 4), (15, 4), (20, 4), (21, 5), (30, 5), (31, 5), (36, 6), (45, 8), (60, 10)],
)
def test_scene_count_rule(duration, count):
    assert scene_count(duration) == count


@pytest.mark.parametrize("duration", range(9, 61))
def test_durations_sum_and_bounds(duration):
    durations = scene_durations(duration)
    assert sum(durations) == duration
    assert all(3 <= d <= 7 for d in durations)
    assert max(durations) - min(durations) <= 1


class ScriptedChat:
    """Answers from a list, recording what it was sent."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    async def complete(self, messages, *, task):
        self.calls.append((task, messages))
        return self.replies.pop(0)


async def test_planner_retries_wrong_scene_count_then_succeeds():
    bad = json.dumps({"scenes": [{"description": "only one scene"}]})
    good = json.dumps({"scenes": [{"description": f"scene {i}"} for i in range(4)]})
    chat = ScriptedChat([bad, good])
    plan = await plan_storyboard(chat, "Artisan coffee that starts your morning right", 15, retries=2)
    assert [s.scene_number for s in plan] == [1, 2, 3, 4]
    assert [s.duration for s in plan] == [4, 4, 4, 3]
    assert plan[2].prompt == "scene 2"
    assert len(chat.calls) == 2
    inputs = json.loads(chat.calls[0][1][-1]["content"])
    assert inputs["scene_count"] == 4 and inputs["durations"] == [4, 4, 4, 3]
    # The corrective message names the problem.
    assert "expected exactly 4 scenes" in chat.calls[1][1][-1]["content"]


async def test_planner_gives_up_after_bounded_retries():
    chat = ScriptedChat(["not json"] * 3)
    with pytest.raises(InvalidOutputError, match="3 attempt"):
        await plan_storyboard(chat, "Artisan coffee that starts your morning right", 15, retries=2)
    assert len(chat.calls) == 3


# --- consistency sheet ------------------------------------------------------------------------

SHEET = {
    "product": {"name": "Bean & Co espresso", "shape": "squat glass jar", "colours": "amber with a black lid",
                "materials": "glass and steel", "logo_placement": "front label"},
    "characters": [{"name": "Ana", "age": "late twenties", "hair": "black bob", "clothing": "red apron"}],
    "setting": "a tiled corner cafe", "style": "warm film look",
}


def sheet_reply(markers_per_scene):
    return json.dumps({"consistency": SHEET, "scenes": [
        {"description": f"scene {i} description.", "markers": m} for i, m in enumerate(markers_per_scene)
    ]})


async def test_the_sheet_becomes_markers_carried_verbatim_by_each_scene():
    chat = ScriptedChat([sheet_reply([["product"], ["ana", "setting"], None, ["unknown"]])])
    plan = await plan_storyboard(chat, "Artisan coffee that starts your morning right", 15, retries=0)
    product = "Bean & Co espresso: squat glass jar, amber with a black lid, glass and steel, logo front label"
    ana = "Ana: late twenties, black bob, red apron"
    style, setting = "Style: warm film look", "Setting: a tiled corner cafe"
    assert plan[0].markers == [product, style]  # style is in every scene
    assert plan[1].markers == [ana, setting, style]
    assert plan[2].markers == [product, ana, setting, style]  # no list: every marker
    assert plan[3].markers == [style]
    assert plan[1].prompt == f"scene 1 description. {ana}. {setting}. {style}."
    assert plan[1].description == "scene 1 description."
    assert all(p.sheet == plan[0].sheet and p.sheet.source == "prompt" for p in plan)
    assert "consistency sheet" in chat.calls[0][1][0]["content"]


async def test_a_user_image_goes_to_a_vision_model_or_the_sheet_says_it_was_not_seen():
    image = b"\x89PNG fake bytes"
    chat = ScriptedChat([sheet_reply([None] * 4)])
    plan = await plan_storyboard(chat, "Artisan coffee that starts your morning right", 15, retries=0, image=image)
    text, picture = chat.calls[0][1][1]["content"]
    assert json.loads(text["text"])["image_attached"] is True
    assert picture["image_url"]["url"].startswith("data:image/png;base64,")
    assert plan[0].sheet.source == "image"

    chat = ScriptedChat([sheet_reply([None] * 4)])
    plan = await plan_storyboard(
        chat, "Artisan coffee that starts your morning right", 15, retries=0, image=image, accepts_images=False
    )
    assert json.loads(chat.calls[0][1][1]["content"])["image_attached"] is False
    assert plan[0].sheet.source == "prompt-no-vision"


async def test_no_sheet_means_no_markers_and_markers_can_be_switched_off():
    chat = ScriptedChat([json.dumps({"scenes": [{"description": f"scene {i}"} for i in range(4)]})])
    plan = await plan_storyboard(chat, "Artisan coffee that starts your morning right", 15, retries=0)
    assert all(p.markers == [] and p.sheet is None for p in plan) and plan[0].prompt == "scene 0"
    chat = ScriptedChat([sheet_reply([None] * 4)])
    plan = await plan_storyboard(chat, "Artisan coffee that starts your morning right", 15, retries=0, markers=False)
    assert all(p.markers == [] and p.sheet is not None for p in plan) and plan[0].prompt == "scene 0 description."


async def test_the_offline_planner_writes_a_sheet():
    from pipeline.providers.offline import OfflineChat

    plan = await plan_storyboard(OfflineChat(), "A launch video for Aurora, a smart desk lamp", 20, retries=0)
    sheet = plan[0].sheet
    assert sheet.product.name.startswith("Aurora") and len(sheet.characters) == 1 and sheet.setting and sheet.style
    assert all(p.markers and p.prompt.endswith(p.markers[-1] + ".") for p in plan)
