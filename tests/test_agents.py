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


# --- consistency markers ---------------------------------------------------------------------

MARKERS = ["Aurora lamp: slim arched arm, matte white, logo on the base", "Style: soft morning light, warm neutrals"]
MARKED = ScenePlan(
    scene_number=2, duration=4, prompt="A reader switches on the lamp. " + ". ".join(MARKERS) + ".",
    description="A reader switches on the lamp", markers=MARKERS,
)


def marked_rewrite(i, markers=MARKERS):
    return json.dumps({"enhanced_prompt": f"rewrite {i}, a reader at a desk, 35mm lens. " + ". ".join(markers)})


async def test_a_rewrite_that_drops_a_marker_is_refused_and_the_loop_goes_on():
    chat = ScriptedChat([
        marked_rewrite(1, MARKERS[:1]),  # drops the style marker: refused, agent 2 never sees it
        marked_rewrite(2),
        review(90, 90, 90, 90, 90),
    ])
    result = await enhance_scene(chat, MARKED, STORY, max_iterations=4, settings=EnhancementSettings(), retries=0)
    assert [task for task, _, _ in chat.calls] == ["cinematographer", "cinematographer", "prompt_engineer"]
    refused, kept = result.iterations
    assert refused.dropped_markers == [MARKERS[1]] and "dropped 1 consistency marker" in refused.error
    assert refused.scores is None and refused.enhanced_prompt.startswith("rewrite 1")
    assert result.total_iterations == 2 and result.approved
    assert result.final_prompt.startswith("rewrite 2") and "1 rewrite(s) refused" in result.stop_reason
    # Agent 1 is told which markers to restore, and both agents get the markers.
    second = chat.calls[1][1]
    assert second["markers"] == MARKERS and MARKERS[1] in second["critique"]
    assert second["improvements"] == [f"Restore verbatim: {MARKERS[1]}"]
    assert chat.calls[2][1]["markers"] == MARKERS


async def test_when_every_rewrite_drops_a_marker_the_scene_prompt_is_kept():
    chat = ScriptedChat([marked_rewrite(i, []) for i in (1, 2)])
    result = await enhance_scene(chat, MARKED, STORY, max_iterations=2, settings=EnhancementSettings(), retries=0)
    assert result.final_prompt == MARKED.prompt and result.final_overall is None
    assert all(r.dropped_markers == MARKERS for r in result.iterations)


async def test_markers_are_matched_verbatim_up_to_case_and_spacing():
    spaced = [m.upper().replace(" ", "  ") for m in MARKERS]
    chat = ScriptedChat([marked_rewrite(1, spaced), review(90, 90, 90, 90, 90)])
    result = await enhance_scene(chat, MARKED, STORY, max_iterations=1, settings=EnhancementSettings(), retries=0)
    assert result.iterations[0].dropped_markers == [] and result.approved
    reworded = [MARKERS[0].replace("matte white", "white"), MARKERS[1]]
    chat = ScriptedChat([marked_rewrite(1, reworded)])
    result = await enhance_scene(chat, MARKED, STORY, max_iterations=1, settings=EnhancementSettings(), retries=0)
    assert result.iterations[0].dropped_markers == [MARKERS[0]]


def test_the_offline_agents_keep_markers_and_judge_them():
    from pipeline.providers.offline.agents import cinematographer, prompt_engineer

    bare = ScenePlan(scene_number=2, duration=4, prompt="A reader switches on the lamp", markers=MARKERS)
    rewritten = cinematographer(bare.prompt, STORY, markers=MARKERS)["enhanced_prompt"]
    assert all(m.rstrip(".") in rewritten for m in MARKERS)
    kept = prompt_engineer(bare.prompt, STORY, rewritten, markers=MARKERS)
    lost = prompt_engineer(bare.prompt, STORY, rewritten.replace(MARKERS[0], "a lamp"), markers=MARKERS)
    assert lost["scores"]["brand_alignment"] < kept["scores"]["brand_alignment"]
    assert lost["improvements"][0] == f"Restore the consistency marker word for word: {MARKERS[0]}"


async def test_each_iteration_is_heard_as_soon_as_it_is_decided():
    """Live progress: `on_iteration` hears iteration i before agent 1 is asked for i+1,
    failed iterations included."""
    replies = [rewrite(1), review(60, 60, 60, 60, 60), rewrite(2), "{not json", "nope"]
    chat = ScriptedChat(replies)
    heard: list[tuple[int, int, bool]] = []

    async def on_iteration(record):
        heard.append((record.iteration, len(chat.calls), record.error is not None))

    result = await enhance_scene(chat, SCENE, STORY, max_iterations=4, settings=EnhancementSettings(), retries=1,
                                 on_iteration=on_iteration)
    assert [i for i, _, _ in heard] == [r.iteration for r in result.iterations] == [1, 2]
    assert heard[0] == (1, 2, False)  # after agent 2's first review, before the second rewrite
    assert heard[1][2] is True  # the failed review of iteration 2 is heard too
