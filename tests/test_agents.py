import json

import pytest

from pipeline.agents import enhance_scene, overall_score
from pipeline.schemas import DimensionScores, ScenePlan
from pipeline.settings import DimensionWeights, EnhancementSettings

SCENE = ScenePlan(scene_number=2, duration=4, prompt="A barista pours latte art in a sunny cafe")
STORY = "Artisan coffee that starts your morning right"


def review(c, s, p, cin, b, *, overall=None):
    body = {
        "scores": {"completeness": c, "specificity": s, "professionalism": p, "cinematography": cin, "brand_alignment": b},
        "critique": f"critique for {c}",
        "improvements": [f"improve {c}"],
    }
    if overall is not None:
        body["overall"] = overall
    return json.dumps(body)


def rewrite(i):
    return json.dumps({"enhanced_prompt": f"rewrite number {i}, 35mm lens, warm 3200K key light"})


class ScriptedChat:
    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    async def complete(self, messages, *, task):
        self.calls.append((task, json.loads(messages[1]["content"]), messages))
        return self.replies.pop(0)


def test_overall_is_weighted_by_the_guide_weights():
    scores = DimensionScores(completeness=80, specificity=90, professionalism=70, cinematography=60, brand_alignment=100)
    expected = 0.25 * 80 + 0.25 * 90 + 0.20 * 70 + 0.15 * 60 + 0.15 * 100
    assert overall_score(scores, DimensionWeights()) == pytest.approx(expected)


async def test_stops_when_approved_and_ignores_reported_overall():
    chat = ScriptedChat([rewrite(1), review(70, 70, 70, 70, 70, overall=99), rewrite(2), review(90, 90, 85, 80, 90)])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=4, settings=EnhancementSettings(), retries=1)
    assert result.total_iterations == 2
    assert result.approved
    assert result.initial_overall == 70  # the LLM's "overall: 99" is ignored
    assert result.final_overall == pytest.approx(0.25 * 90 + 0.25 * 90 + 0.2 * 85 + 0.15 * 80 + 0.15 * 90)
    assert result.final_prompt.startswith("rewrite number 2")
    assert "approved at iteration 2" in result.stop_reason
    # The critique of iteration 1 is fed back to agent 1 in iteration 2.
    second = chat.calls[2]
    assert second[0] == "cinematographer"
    assert second[1]["critique"] == "critique for 70"
    assert second[1]["improvements"] == ["improve 70"]
    assert second[1]["previous_prompt"].startswith("rewrite number 1")


async def test_keeps_best_prompt_at_iteration_limit():
    replies = []
    for i, s in enumerate([60, 80, 70], start=1):
        replies += [rewrite(i), review(s, s, s, s, s)]
    chat = ScriptedChat(replies)
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=3, settings=EnhancementSettings(), retries=0)
    assert result.total_iterations == 3
    assert not result.approved
    assert result.final_prompt.startswith("rewrite number 2")
    assert result.final_overall == 80
    assert "iteration limit 3" in result.stop_reason and "kept iteration 2" in result.stop_reason
    assert len(chat.calls) == 6


async def test_invalid_review_is_retried_then_loop_keeps_best_so_far():
    chat = ScriptedChat(
        [rewrite(1), review(75, 75, 75, 75, 75), rewrite(2), "{not json", '{"scores": {"completeness": 500}}', "nope"]
    )
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=4, settings=EnhancementSettings(), retries=2)
    assert result.final_prompt.startswith("rewrite number 1")
    assert result.final_overall == 75
    assert "agent 2 failed at iteration 2" in result.stop_reason
    assert result.iterations[-1].error and "3 attempt" in result.iterations[-1].error
    assert len(chat.calls) == 6  # 2 + 1 rewrite + 3 tries of agent 2


async def test_no_valid_review_keeps_last_rewrite_and_says_why():
    chat = ScriptedChat([rewrite(1), "x", "y"])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=2, settings=EnhancementSettings(), retries=1)
    assert result.final_prompt.startswith("rewrite number 1")
    assert result.final_overall is None
    assert "no scored prompt" in result.stop_reason


async def test_custom_approval_score():
    chat = ScriptedChat([rewrite(1), review(50, 50, 50, 50, 50)])
    settings = EnhancementSettings(approval_score=50)
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=4, settings=settings, retries=0)
    assert result.approved and result.total_iterations == 1


async def test_agent1_failure_is_recorded_as_agent1s_with_no_prompt():
    """A failed rewrite produced no prompt: the record must not carry the previous iteration's
    prompt as if agent 1 had written it again (the trace files would show it as new)."""
    from pipeline.agents import failed_agent

    chat = ScriptedChat([rewrite(1), review(70, 70, 70, 70, 70), "{not json"])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=4, settings=EnhancementSettings(), retries=0)
    first, failed = result.iterations
    assert failed.iteration == 2 and failed.enhanced_prompt == "" and failed.error
    assert failed_agent(failed) == "cinematographer" and failed_agent(first) is None
    assert "agent 1 failed at iteration 2" in result.stop_reason
    assert result.final_prompt.startswith("rewrite number 1") and result.total_iterations == 2


async def test_agent2_failure_keeps_agent1s_prompt():
    from pipeline.agents import failed_agent

    chat = ScriptedChat([rewrite(1), "nope"])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=2, settings=EnhancementSettings(), retries=0)
    (record,) = result.iterations
    assert record.enhanced_prompt.startswith("rewrite number 1") and failed_agent(record) == "prompt_engineer"


async def test_blank_rewrite_is_an_agent1_failure():
    from pipeline.agents import failed_agent

    chat = ScriptedChat([json.dumps({"enhanced_prompt": " " * 12})])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=2, settings=EnhancementSettings(), retries=0)
    (record,) = result.iterations
    assert failed_agent(record) == "cinematographer" and "blank" in record.error
    assert result.final_prompt == SCENE.prompt and len(chat.calls) == 1
