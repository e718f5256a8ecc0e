"""Scoring through Serve: images by object reference score exactly as inline bytes, and a
scoring call whose replica is killed mid-call still returns once Serve has restarted it.

Its own small app ("failover": two scorer deployments on the tiny models), so killing a replica
never disturbs the shared offline app of the other Serve tests. The scorer class is the real
ScorerDeployment with three test hooks: a delay in the forward pass (to have a call in flight
for sure), a count of forward passes started, and the replica's own actor handle (to kill it).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.serve

APP = "failover"
PROMPT = "a cup of coffee on a wooden table, morning light"


def png(seed: int) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (96, 54), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    image.paste((250, 240, 10), (10 + seed, 10, 40 + seed, 30))
    image.save(out, format="PNG")
    return out.getvalue()


def scorer_class():
    import ray
    from ray import cloudpickle, serve

    from deployments.scorer import ScorerDeployment

    # The replica imports this class by value: the tests package is not on the workers' path.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class HookedScorer(ScorerDeployment.func_or_class):
        def __init__(self, *args):
            super().__init__(*args)
            self.delay_s, self.passes, self.payload_types = 0.0, 0, []

        def slow_down(self, delay_s: float) -> None:
            self.delay_s = delay_s

        def _score(self, requests):
            self.passes += 1
            time.sleep(self.delay_s)
            return super()._score(requests)

        async def score_text(self, image, prompt):
            self.payload_types.append(type(image).__name__)
            return await super().score_text(image, prompt)

        def forward_passes(self) -> int:
            return self.passes

        def seen_payload_types(self) -> list[str]:
            return list(self.payload_types)

        def actor(self):
            return ray.get_runtime_context().current_actor

    return serve.deployment(HookedScorer, max_ongoing_requests=32, health_check_period_s=1)


@pytest.fixture(scope="module")
def scorers(ray_cluster, tiny_models):
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    deployment = scorer_class()

    # A tiny ingress-less app: two scorer deployments, each its own replica.
    @serve.deployment(num_replicas=1)
    class Holder:
        def __init__(self, pick: DeploymentHandle, clip: DeploymentHandle):
            pass

        def ready(self) -> bool:
            return True

    pick = deployment.options(name="FailoverPickScore", ray_actor_options={"num_cpus": 0.5, "num_gpus": 0})
    clip = deployment.options(name="FailoverCLIPScore", ray_actor_options={"num_cpus": 0.5, "num_gpus": 0})
    app = Holder.options(ray_actor_options={"num_cpus": 0.1}).bind(
        pick.bind("pickscore", None, str(tiny_models)), clip.bind("clipscore", None, str(tiny_models))
    )
    serve.run(app, name=APP, route_prefix=None)
    handles = {
        "pickscore": serve.get_deployment_handle("FailoverPickScore", app_name=APP),
        "clipscore": serve.get_deployment_handle("FailoverCLIPScore", app_name=APP),
    }
    yield handles
    serve.delete(APP)


def test_images_by_reference_score_exactly_as_inline_bytes(scorers):
    from deployments.adapters import HandleScoring

    images, prompts = [png(i) for i in range(3)], [PROMPT, "a red bicycle by a lake", PROMPT]

    async def both():
        inline = HandleScoring(scorers, by_reference=False)
        by_ref = HandleScoring(scorers)
        return await inline.score(images, prompts), await by_ref.score(images, prompts), inline, by_ref

    before = {name: len(h.seen_payload_types.remote().result(timeout_s=30)) for name, h in scorers.items()}
    inline_scores, ref_scores, inline, by_ref = asyncio.run(both())
    for a, b in zip(inline_scores, ref_scores):
        assert set(a) == set(b) == {"pickscore", "clipscore"}
        for name in a:
            assert b[name].score == pytest.approx(a[name].score, abs=1e-4)
            assert b[name].raw == pytest.approx(a[name].raw, abs=1e-6)
    # The replicas received bytes both times: Ray resolved the references before `score` ran.
    for name, handle in scorers.items():
        assert handle.seen_payload_types.remote().result(timeout_s=30)[before[name]:] == ["bytes"] * 6
    size = sum(len(i) for i in images)
    assert (inline.sent.inline, inline.sent.put) == (2 * size, 0)
    assert (by_ref.sent.inline, by_ref.sent.put) == (0, size)


def test_a_scoring_call_survives_its_replica_being_killed_mid_call(scorers, caplog):
    import logging

    import ray

    from deployments.adapters import HandleRetry, HandleScoring

    pick = scorers["pickscore"]
    image = png(7)
    scoring = HandleScoring({"pickscore": pick}, HandleRetry(scoring_budget_s=120))
    [reference] = asyncio.run(scoring.score([image], [PROMPT]))

    victim = pick.actor.remote().result(timeout_s=30)
    pick.slow_down.remote(30.0).result(timeout_s=30)
    passes = pick.forward_passes.remote().result(timeout_s=30)

    async def kill_mid_call():
        call = asyncio.ensure_future(scoring.score([image], [PROMPT]))
        while await pick.forward_passes.remote() == passes:  # the call is inside the forward pass
            assert not call.done()
            await asyncio.sleep(0.05)
        ray.kill(victim, no_restart=True)
        return await call

    with caplog.at_level(logging.WARNING, logger="sceneref.handles"):
        started = time.monotonic()
        [after] = asyncio.run(kill_mid_call())
        print(f"scoring call returned {time.monotonic() - started:.1f} s after it was sent (replica killed mid-call)")
    retries = [r.message for r in caplog.records if r.name == "sceneref.handles"]
    assert retries and all(m.startswith("pickscore: replica") for m in retries), retries
    assert after["pickscore"].score == pytest.approx(reference["pickscore"].score, abs=1e-4)
    replacement = pick.actor.remote().result(timeout_s=30)
    assert replacement._actor_id != victim._actor_id  # answered by the replica Serve started anew
