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
