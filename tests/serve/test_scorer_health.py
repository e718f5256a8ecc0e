"""Scorer replicas under failure: one bad image among other callers' good ones fails only its
own caller, and a replica whose model breaks fails its health check and is replaced.

Its own small app ("scorerhealth": one CLIP-Score deployment on the tiny models), so breaking a
replica never disturbs the shared offline app of the other Serve tests. The scorer class is the
real ScorerDeployment with two test hooks: `break_model` (fills the weights with NaN, as a
corrupted checkpoint or a failing device would leave them) and the replica's own actor id.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.serve

APP = "scorerhealth"
PROMPT = "a cup of coffee on a wooden table, morning light"


def png(seed: int, size: tuple[int, int] = (96, 54)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    image.save(out, format="PNG")
    return out.getvalue()


def scorer_class():
    import ray
    from ray import cloudpickle, serve

    from deployments.scorer import ScorerDeployment

    # The replica imports this class by value: the tests package is not on the workers' path.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class BreakableScorer(ScorerDeployment.func_or_class):
        def break_model(self) -> None:
            import torch

            with torch.no_grad():
                for parameter in self.model.clip.model.parameters():
                    parameter.fill_(float("nan"))

        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    return serve.deployment(BreakableScorer, max_ongoing_requests=64, health_check_period_s=1, health_check_timeout_s=30)


@pytest.fixture(scope="module")
def clip(ray_cluster, tiny_models):
    from ray import serve

    deployment = scorer_class().options(
        name="HealthCLIPScore",
        ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
        user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05, "health_check_cache_s": 1.0},
    )
    serve.run(deployment.bind("clipscore", None, str(tiny_models)), name=APP, route_prefix=None)
    yield serve.get_deployment_handle("HealthCLIPScore", app_name=APP)
    serve.delete(APP)


def test_a_bad_image_fails_only_its_own_caller(clip):
    """Nine callers at once, one of them with an 8x8 image the scorers refuse. Before: the
    merged pass raised and all nine got the error. Now the eight others get their scores and
    the bad one's error names its image."""

    async def all_at_once():
        calls = [clip.score_text.remote(png(i), f"{PROMPT} {i}") for i in range(8)]
        calls.insert(4, clip.score_text.remote(png(99, (8, 8)), PROMPT))
        return await asyncio.gather(*calls, return_exceptions=True)

    batch_sizes_before = len(clip.recent_batch_sizes.remote().result(timeout_s=30))
    results = asyncio.run(all_at_once())
    bad = results.pop(4)
    assert all(isinstance(r, dict) and 0 <= r["score"] <= 100 for r in results), results
    assert isinstance(bad, Exception)
    assert "ItemError" in str(bad) and "PNG 8x8 px" in str(bad) and "at least 16x16" in str(bad)
    sizes = clip.recent_batch_sizes.remote().result(timeout_s=30)[batch_sizes_before:]
    assert max(sizes) > 1, sizes  # the bad image really was merged with others first


def test_a_broken_model_fails_its_health_check_and_serve_replaces_the_replica(clip):
    """Before: check_health tested `self.model is None`, so a replica with NaN weights stayed
    healthy and answered NaN scores. Now its health probe fails and Serve starts a new one."""
    before = clip.actor_id.remote().result(timeout_s=30)
    good = clip.score_text.remote(png(1), PROMPT).result(timeout_s=60)
    # Idle: the health check runs its probe (the cache is 1 s, the period 1 s).
    deadline = time.monotonic() + 30
    while clip.health_probes.remote().result(timeout_s=30) == 0:
        assert time.monotonic() < deadline, "no health probe ran"
        time.sleep(0.5)

    clip.break_model.remote().result(timeout_s=30)
    with pytest.raises(Exception, match="non-finite score"):
        clip.score_text.remote(png(1), PROMPT).result(timeout_s=60)  # never a made-up number

    deadline = time.monotonic() + 120
    while True:
        try:
            if clip.actor_id.remote().result(timeout_s=30) != before:
                break
        except Exception:
            pass  # the broken replica is going away
        assert time.monotonic() < deadline, "Serve did not replace the unhealthy replica"
        time.sleep(1)
    again = clip.score_text.remote(png(1), PROMPT).result(timeout_s=120)
    assert again["score"] == pytest.approx(good["score"], abs=1e-4)  # the new replica loaded the real weights
