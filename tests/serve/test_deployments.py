"""Handle-level tests of each deployment on a real local Ray, and the batching proof."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

pytestmark = pytest.mark.serve


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 36), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(out, format="PNG")
    return out.getvalue()


def handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="sceneref")


@pytest.mark.parametrize("deployment", ["PickScore", "CLIPScore", "VQAScore", "Aesthetic"])
def test_scorer_deployment_scores_one_image(offline_app, deployment):
    result = handle(deployment).score_text.remote(png(1), "a cup of coffee on a wooden table").result(timeout_s=120)
    assert set(result) == {"raw", "score", "truncated"}
    assert 0 <= result["score"] <= 100 and result["truncated"] is False


def test_scorer_flags_truncated_prompts(offline_app):
    long_prompt = " ".join(["espresso"] * 120)
    assert handle("CLIPScore").score_text.remote(png(2), long_prompt).result(timeout_s=120)["truncated"] is True


def test_generator_and_agents_deployments(offline_app):
    image = handle("ImageGenerator").generate.remote("a red bicycle by a lake", None, 1).result(timeout_s=60)
    assert image["data"].startswith(b"\x89PNG") and image["metadata"]["provider"] == "offline"
    edited = handle("ImageGenerator").generate.remote("a red bicycle by a lake", image["data"], 2).result(timeout_s=60)
    assert edited["metadata"]["reference_used"] is True and edited["data"] != image["data"]
    inputs = {"prompt": "Artisan coffee that starts your morning right", "scene_count": 3, "durations": [3, 3, 3]}
    reply = handle("PromptAgents").complete.remote(
        [{"role": "system", "content": "plan"}, {"role": "user", "content": json.dumps(inputs)}], "storyboard"
    ).result(timeout_s=60)
    assert len(json.loads(reply["text"])["scenes"]) == 3


async def _concurrent_scores(deployment: str, count: int) -> list[dict]:
    h = handle(deployment)
    # As from different scenes and generations: different images and prompts, all in flight.
    calls = [h.score_text.remote(png(i), f"scene {i % 4} of generation {i // 4}: coffee") for i in range(count)]
    return await asyncio.gather(*calls)


def test_concurrent_requests_are_batched_and_reconfigure_applies(offline_app):
    pick = handle("PickScore")
    before = len(pick.recent_batch_sizes.remote().result(timeout_s=30))
    results = asyncio.run(_concurrent_scores("PickScore", 16))
    assert len(results) == 16
    sizes = pick.recent_batch_sizes.remote().result(timeout_s=30)[before:]
    assert sum(sizes) == 16 and max(sizes) > 1, sizes

    # Same numbers one at a time: batching changes throughput, never the scores.
    single = pick.score_text.remote(png(5), "scene 1 of generation 1: coffee").result(timeout_s=60)
    assert single["score"] == pytest.approx(results[5]["score"], abs=1e-3)

    # reconfigure (what a user_config change calls, without restarting the replica):
    # max_batch_size 1 means batches of one.
    pick.reconfigure.remote({"max_batch_size": 1, "batch_wait_timeout_s": 0.0}).result(timeout_s=30)
    try:
        before = len(pick.recent_batch_sizes.remote().result(timeout_s=30))
        asyncio.run(_concurrent_scores("PickScore", 8))
        after = pick.recent_batch_sizes.remote().result(timeout_s=30)[before:]
        assert after == [1] * 8, after
    finally:
        pick.reconfigure.remote({"max_batch_size": 16, "batch_wait_timeout_s": 0.01}).result(timeout_s=30)
