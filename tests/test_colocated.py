"""The co-located scoring layout (scoring throughput): one replica holding the four text-image models,
one request per image. Its own logic without Ray: the scores equal each model's own, per-model
batch limits, a bad image named to its own caller, health, the typed config and the app's
wiring; and its adapter against a fake handle. Under `serve run`: tests/serve/test_serve_run.py
(the offline config uses this layout)."""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image

import scorers
from deployments.colocated import ColocatedBatchConfig, ColocatedScorer, colocated_deployment_options
from deployments.scorer import ImagePair, ItemError, ScorerDeployment, TextImage, UnhealthyModel
from pipeline.ranking import ScoringError
from scorers.ensemble import Ensemble

NAMES = list(scorers.SCORER_NAMES)


def png(size=(64, 36), seed=0) -> bytes:
    image = Image.effect_noise(size, 40 + seed).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


CPU = {"device": "cpu", "dtype": "fp32"}


def colocated(tiny_models_dir, names=NAMES, consistency=False, **config) -> ColocatedScorer:
    options = {name: CPU for name in [*names, "consistency"]}
    replica = ColocatedScorer.func_or_class(names, options, tiny_models_dir, 1, "pil", consistency)
    replica.reconfigure(config)
    return replica


async def test_one_request_gets_every_models_score_equal_to_the_separate_replicas(tiny_models_dir):
    replica = colocated(tiny_models_dir)
    requests = [TextImage(png(seed=i), f"a cup of coffee number {i}") for i in range(3)]
    results = await replica.coalescer.submit(requests)
    assert [sorted(r) for r in results] == [sorted(NAMES)] * 3
    for name in NAMES:
        alone = ScorerDeployment.func_or_class(name, CPU, tiny_models_dir)
        expected = await alone.coalescer.submit(requests)
        for got, want in zip(results, expected):
            assert got[name]["raw"] == pytest.approx(want["raw"], abs=1e-5)
            assert got[name]["score"] == pytest.approx(want["score"], abs=1e-4)
            assert got[name]["truncated"] == want["truncated"]


async def test_each_model_keeps_its_own_batch_limit(tiny_models_dir):
    replica = colocated(tiny_models_dir, batch_wait_timeout_s=0.0, max_batch_size=16, model_max_batch_size={"vqascore": 2})
    await replica.coalescer.submit([TextImage(png(seed=i), "a prompt") for i in range(5)])
    sizes = replica.model_batch_sizes()
    assert sizes["vqascore"] == [2, 2, 1]
    assert sizes["pickscore"] == sizes["clipscore"] == sizes["aesthetic"] == [5]
    assert replica.recent_batch_sizes() == [5]


async def test_text_requests_and_image_pairs_share_one_pass_and_each_image_is_decoded_once(tiny_models_dir, monkeypatch):
    import deployments.scorer as module  # the base class decodes, once per image and pass

    replica = colocated(tiny_models_dir, consistency=True)
    decoded = []
    real = module.decode_input
    monkeypatch.setattr(module, "decode_input", lambda data, path: decoded.append(data) or real(data, path))
    first, second, third = png(seed=1), png(seed=2), png(seed=3)
    results = await replica.coalescer.submit([TextImage(second, "scene two"), TextImage(third, "scene two"), ImagePair(second, first), ImagePair(third, first)])
    assert sorted(results[0]) == sorted(NAMES) and sorted(results[1]) == sorted(NAMES)
    assert list(results[2]) == list(results[3]) == ["consistency"]
    assert sorted(decoded) == sorted([first, second, third])  # once each, for all five models
    alone = ScorerDeployment.func_or_class("consistency", CPU, tiny_models_dir)
    expected = await alone.coalescer.submit([ImagePair(second, first), ImagePair(third, first)])
    assert [r["consistency"]["raw"] for r in results[2:]] == pytest.approx([e["raw"] for e in expected], abs=1e-5)
    assert replica.model_batch_sizes()["consistency"] == [2]
    replica.health_check_cache_s = 0
    await replica.check_health()  # the probe runs the consistency model too
    assert replica.probes == 1


async def test_pairs_sent_to_a_replica_without_the_consistency_model_are_refused(tiny_models_dir):
    replica = colocated(tiny_models_dir, names=["clipscore"])
    [result] = await replica.coalescer.submit([ImagePair(png(), png(seed=2))])
    assert isinstance(result, ItemError) and "does not hold the consistency model" in str(result)


async def test_a_bad_image_is_named_to_its_own_caller_and_the_others_are_scored(tiny_models_dir):
    replica = colocated(tiny_models_dir)
    results = await replica.coalescer.submit([TextImage(png(), "good"), TextImage(b"not an image", "junk"), TextImage(png(seed=2), "good too")])
    assert isinstance(results[0], dict) and isinstance(results[2], dict)
    assert isinstance(results[1], ItemError)
    assert "item 2 of 3" in str(results[1]) and "12 bytes (not a readable image)" in str(results[1])


async def test_the_health_probe_runs_every_model_and_names_a_broken_one(tiny_models_dir):
    replica = colocated(tiny_models_dir, health_check_cache_s=0)
    await replica.check_health()
    assert replica.probes == 1
    with torch.no_grad():
        for parameter in replica.ensemble.models["aesthetic"].head.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(UnhealthyModel, match="Scoring health probe failed.*aesthetic gave a non-finite score"):
        await replica.check_health()


def test_the_replica_reports_its_device_without_made_up_memory_figures(tiny_models_dir):
    stats = colocated(tiny_models_dir, names=["clipscore"]).device_stats()
    assert stats == {"device": "cpu", "max_memory_allocated": None, "memory_reserved": None}


def test_the_config_refuses_unknown_models_and_limits_below_one():
    with pytest.raises(ValueError, match="unknown scorer.*pickscor"):
        ColocatedBatchConfig(model_max_batch_size={"pickscor": 4})
    with pytest.raises(ValueError, match="at least 1"):
        ColocatedBatchConfig(model_max_batch_size={"vqascore": 0})
    options = colocated_deployment_options({"batch": {"max_batch_size": 8, "model_max_batch_size": {"vqascore": 2}}, "num_cpus": 2})
    assert options["max_ongoing_requests"] == 64
    assert options["user_config"]["model_max_batch_size"] == {"vqascore": 2}
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_a_limit_for_a_model_the_replica_does_not_hold_is_refused(tiny_models_dir):
    replica = colocated(tiny_models_dir, names=["clipscore"])
    with pytest.raises(ValueError, match="not loaded: vqascore"):
        replica.reconfigure({"model_max_batch_size": {"vqascore": 2}})


def test_models_on_two_devices_are_refused(tiny_models_dir):
    options = {"clipscore": CPU, "aesthetic": {**CPU, "device": "meta"}}
    with pytest.raises(ValueError, match="share one device"):
        ColocatedScorer.func_or_class(["clipscore", "aesthetic"], options, tiny_models_dir)


def test_the_ensemble_checks_its_inputs():
    with pytest.raises(ValueError, match="at least one scorer"):
        Ensemble({})
    with pytest.raises(ValueError, match="not loaded: vqascore"):
        Ensemble({"clipscore": object()}, {"vqascore": 2})
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        Ensemble({"clipscore": object()}).score([1, 2], ["p"])


def test_the_app_binds_one_scoring_deployment_in_the_colocated_layout(tmp_path):
    from deployments.app import COLOCATED_DEPLOYMENT, SCORER_DEPLOYMENTS, scoring_deployments
    from deployments.args import AppArgs

    base = {"database_url": f"sqlite:///{tmp_path}/db.sqlite", "offline_models_dir": str(tmp_path / "models"),
            "allow_random_weights": True}
    separate = scoring_deployments(AppArgs.model_validate(base))
    assert separate.layout == "separate" and separate.colocated is None
    bound = {name: app._bound_deployment.name for name, app in [*separate.per_model.items(), ("consistency", separate.consistency)]}
    assert bound == SCORER_DEPLOYMENTS
    assert separate.per_model["vqascore"]._bound_deployment.init_kwargs["name"] == "vqascore"  # bound by keyword

    args = AppArgs.model_validate({**base, "pipeline": {"scoring": {"weights": {"vqascore": 0}}}, "scorers": {
        "layout": "colocated", "colocated": {"num_cpus": 2, "batch": {"max_batch_size": 8}}}})
    apps = scoring_deployments(args)
    assert apps.layout == "colocated" and not apps.per_model and apps.consistency is None  # Scoring holds consistency too
    scoring = apps.colocated._bound_deployment
    assert scoring.name == COLOCATED_DEPLOYMENT
    assert scoring.ray_actor_options["num_cpus"] == 2 and scoring.max_ongoing_requests == 64
    bound_names = scoring.init_kwargs["names"]
    assert bound_names == ["pickscore", "clipscore", "aesthetic"]  # weight 0: not loaded
    assert sorted(scoring.init_kwargs["options"]) == sorted([*bound_names, "consistency"])
    assert scoring.init_kwargs["consistency"] is True  # with the consistency model
    assert scoring.init_args == ()  # bound by keyword
    with pytest.raises(ValueError, match="layout"):
        AppArgs.model_validate({"scorers": {"layout": "one-big-box"}})


# --- the adapter ----------------------------------------------------------------------------------


class Method:
    def __init__(self, behaviour):
        self.behaviour, self.calls = behaviour, []

    def remote(self, *args):
        self.calls.append(args)
        return self.behaviour(*args)


class Handle:
    """The Scoring deployment's two methods: text-image scores and image pairs."""

    deployment_name = "Scoring"

    def __init__(self, behaviour):
        self.score_text = Method(behaviour)
        self.score_pair = Method(behaviour)


def answer(names):
    async def behaviour(image, prompt):
        await asyncio.sleep(0)
        return {name: {"raw": float(len(prompt)), "score": 50.0, "truncated": False} for name in names}

    return behaviour


async def test_the_adapter_sends_each_image_once_and_reads_every_models_score():
    from deployments.adapters import HandleColocatedScoring

    handle = Handle(answer(NAMES))
    client = HandleColocatedScoring(handle, ["pickscore", "clipscore"])
    puts = []
    client.put = lambda data: puts.append(data) or f"ref-{len(puts)}"
    results = await client.score([b"one", b"two"], ["short", "a longer prompt"])
    assert puts == [b"one", b"two"]
    assert handle.score_text.calls == [("ref-1", "short"), ("ref-2", "a longer prompt")] and handle.score_pair.calls == []
    assert [sorted(r) for r in results] == [["clipscore", "pickscore"]] * 2  # the weighed models only
    assert results[1]["pickscore"].raw == len("a longer prompt")
    assert client.sent.calls == 2 and client.sent.put == 6


async def test_the_consistency_adapter_reads_the_pair_answer_of_the_scoring_deployment():
    from deployments.adapters import HandleConsistency

    async def pair(image, reference):
        return {"consistency": {"raw": 0.5, "score": 50.0, "truncated": False}}

    handle = Handle(pair)
    client = HandleConsistency(handle, colocated=True)
    client.scoring.put = lambda data: data
    first = b"first"
    [a, b] = await client.similarity([b"two", b"three"], [first, first])
    assert a.raw == b.raw == 0.5 and len(handle.score_pair.calls) == 2 and handle.score_text.calls == []


async def test_an_answer_without_a_weighed_model_is_an_error_not_a_missing_score():
    from deployments.adapters import HandleColocatedScoring

    client = HandleColocatedScoring(Handle(answer(["pickscore"])), ["pickscore", "vqascore"])
    client.put = lambda data: data
    with pytest.raises(ScoringError, match="gave no vqascore score"):
        await client.score([b"one"], ["p"])


async def test_the_tensor_input_path_scores_within_the_documented_tolerance(tiny_models_dir):
    """`scoring.input_path: tensor` (docs/scoring.md, "Input path"): the replica decodes to a
    uint8 tensor once and each model resizes on its device; scores stay within 0.05 points of
    the PIL reference path, consistency pairs included."""
    options = {name: CPU for name in [*NAMES, "consistency"]}
    reference = ColocatedScorer.func_or_class(NAMES, options, tiny_models_dir, 1, "pil", True)
    tensor = ColocatedScorer.func_or_class(NAMES, options, tiny_models_dir, 1, "tensor", True)
    requests = [TextImage(png((300, 200), seed=4), "a cup of coffee"), ImagePair(png((96, 54), seed=5), png((300, 200), seed=4))]
    expected, got = await reference.coalescer.submit(requests), await tensor.coalescer.submit(requests)
    for want, have in zip(expected, got):
        assert sorted(want) == sorted(have)
        for name in want:
            assert have[name]["score"] == pytest.approx(want[name]["score"], abs=0.05)
    with pytest.raises(ValueError, match="unknown input_path"):
        ColocatedScorer.func_or_class(["clipscore"], options, tiny_models_dir, 1, "gpu")
