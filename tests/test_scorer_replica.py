"""ScorerDeployment's own logic without Ray: the health probe, its cache, and errors instead of
made-up numbers. (The same class under Serve: tests/serve/test_scorer_health.py.)"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from deployments.scorer import ImagePair, ItemError, ScorerDeployment, TextImage, UnhealthyModel


def png(size=(64, 36)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


def replica(tiny_models_dir, cache_s: float) -> ScorerDeployment:
    scorer = ScorerDeployment.func_or_class("clipscore", {"device": "cpu", "dtype": "fp32"}, tiny_models_dir)
    scorer.health_check_cache_s = cache_s
    return scorer


def break_weights(scorer: ScorerDeployment) -> None:
    with torch.no_grad():
        for parameter in scorer.model.clip.model.parameters():
            parameter.fill_(float("nan"))


async def test_the_health_check_runs_the_model_unless_a_pass_just_succeeded(tiny_models_dir):
    scorer = replica(tiny_models_dir, cache_s=60)
    await scorer.check_health()  # nothing ran yet: a real probe
    assert scorer.probes == 1
    await scorer.check_health()  # the probe itself counts as a recent success
    await scorer._forward([TextImage(png(), "a cup of coffee")])
    await scorer.check_health()
    assert scorer.probes == 1


async def test_a_broken_model_fails_the_health_check_and_gives_no_scores(tiny_models_dir):
    """Before: check_health only tested `self.model is None`, and NaN weights gave NaN scores."""
    scorer = replica(tiny_models_dir, cache_s=0)
    await scorer.check_health()
    break_weights(scorer)
    with pytest.raises(UnhealthyModel, match="clipscore health probe failed.*non-finite score"):
        await scorer.check_health()
    [result] = await scorer.coalescer.submit([TextImage(png(), "a cup of coffee")])
    assert isinstance(result, ItemError) and "non-finite score" in str(result)


async def test_the_cache_does_not_hide_a_model_that_broke_after_it(tiny_models_dir):
    scorer = replica(tiny_models_dir, cache_s=60)
    await scorer._forward([TextImage(png(), "a cup of coffee")])
    break_weights(scorer)
    with pytest.raises(UnhealthyModel):
        await scorer._forward([TextImage(png(), "a cup of coffee")])
    await scorer.check_health()  # within the cache: the earlier success still counts...
    scorer.health_check_cache_s = 0  # ...until it is older than the cache period
    with pytest.raises(UnhealthyModel):
        await scorer.check_health()


async def test_a_request_error_names_its_image(tiny_models_dir):
    scorer = replica(tiny_models_dir, cache_s=5)
    results = await scorer.coalescer.submit([TextImage(png(), "good"), TextImage(png((8, 8)), "tiny"), TextImage(b"not an image", "junk")])
    assert isinstance(results[0], dict)
    assert "item 2 of 3" in str(results[1]) and "PNG 8x8 px" in str(results[1])
    assert "item 3 of 3" in str(results[2]) and "12 bytes (not a readable image)" in str(results[2])


def test_the_replica_sets_torch_threads_from_its_config(tiny_models_dir):
    """Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPU; the replica sets torch's
    threads from `args.scorers.<name>.threads` (default max(1, num_cpus)) instead."""
    import torch

    from deployments.scorer import ScorerDeployment, ScorerServing

    before = torch.get_num_threads()
    try:
        ScorerDeployment.func_or_class("clipscore", {"device": "cpu", "dtype": "fp32"}, tiny_models_dir, threads=2)
        assert torch.get_num_threads() == 2
        assert ScorerServing(num_cpus=3).torch_threads() == 3 and ScorerServing(num_cpus=0).torch_threads() == 1
        assert ScorerServing(num_cpus=0, threads=4).torch_threads() == 4
    finally:
        torch.set_num_threads(before)


async def test_the_consistency_replica_scores_image_pairs_and_names_a_bad_reference(tiny_models_dir):
    """The fifth model (consistency) is served by the same class: its second input is a reference
    image, decoded through the same intake; health probes compare two images."""
    import scorers
    from scorers.tiny import build_tiny_models

    scorer = ScorerDeployment.func_or_class("consistency", {"device": "cpu", "dtype": "fp32"}, tiny_models_dir)
    a, b = png((64, 36)), png((40, 40))
    outputs = scorer._score([ImagePair(a, a), ImagePair(a, b)])
    model = scorers.load_scorer("consistency", **{**build_tiny_models(tiny_models_dir)["consistency"], "device": "cpu"})
    expected = model.score([scorers.open_image(a)] * 2, [scorers.open_image(a), scorers.open_image(b)])
    assert [round(o.score, 4) for o in outputs] == [round(e.score, 4) for e in expected]
    assert outputs[0].score == pytest.approx(100.0, abs=1e-3)  # an image against itself
    scorer.healthy_at = float("-inf")
    await scorer.check_health()
    assert scorer.probes == 1
    with pytest.raises(ItemError, match=r"against a reference image of 5 bytes \(not a readable image\)"):
        _raise_item(await scorer.coalescer.submit([ImagePair(a, b"junk!")]))


def _raise_item(results):
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def test_the_consistency_replica_embeds_each_image_once_however_often_it_is_compared(tiny_models_dir):
    """Scene 1's selected image is the reference of every later variation: before, each pair
    embedded both of its images again (two embeddings per pair)."""
    import scorers
    from scorers.tiny import build_tiny_models

    scorer = ScorerDeployment.func_or_class("consistency", {"device": "cpu", "dtype": "fp32"}, tiny_models_dir)
    first, second, third = png((64, 36)), png((40, 40)), png((50, 30))
    outputs = scorer._score([ImagePair(second, first), ImagePair(third, first)])
    assert scorer.pairs.embedded == 3
    later = scorer._score([ImagePair(third, second), ImagePair(third, first)])  # all three seen: nothing embedded, nothing decoded
    assert scorer.pairs.embedded == 3
    model = scorers.load_scorer("consistency", **{**build_tiny_models(tiny_models_dir)["consistency"], "device": "cpu"})
    opened = {key: scorers.open_image(key) for key in (first, second, third)}
    expected = model.score([opened[second], opened[third], opened[third], opened[third]],
                           [opened[first], opened[first], opened[second], opened[first]])
    got = [o.raw for o in outputs + later]
    assert got == pytest.approx([e.raw for e in expected], abs=1e-5)


def test_the_replica_base_declares_every_hook_its_layouts_provide():
    """Before: ScoringReplica used seven attributes and hooks that only its subclasses defined,
    so a layout missing one failed at its first request under Serve, not when it was made."""
    from deployments.colocated import ColocatedScorer
    from deployments.scorer import ScoringReplica

    hooks = {"label", "device", "_score_texts", "_score_pairs", "_probe", "_named", "_result"}
    assert ScoringReplica.__abstractmethods__ == hooks
    assert not ScorerDeployment.func_or_class.__abstractmethods__
    assert not ColocatedScorer.func_or_class.__abstractmethods__

    class Forgetful(ScoringReplica):
        label = "forgetful"

        def _score_texts(self, images, prompts):
            return []

    with pytest.raises(TypeError, match="_probe"):
        Forgetful()


async def test_each_kind_of_request_is_scored_by_its_own_hook_and_the_wrong_kind_is_refused(tiny_models_dir):
    """Text-image requests (`score_text`) and image pairs (`score_pair`) are two request types;
    a replica whose model takes the other kind names the method to use instead of mistaking a
    prompt for an image. (The methods themselves under Serve: tests/serve/test_deployments.py.)"""
    clip = replica(tiny_models_dir, cache_s=5)
    consistency = ScorerDeployment.func_or_class("consistency", {"device": "cpu", "dtype": "fp32"}, tiny_models_dir)
    [scored] = await clip.coalescer.submit([TextImage(png(), "a cup of coffee")])
    assert set(scored) == {"raw", "score", "truncated"}
    [paired] = await consistency.coalescer.submit([ImagePair(png(), png())])
    assert paired["score"] == pytest.approx(100.0, abs=1e-3)
    [wrong] = await clip.coalescer.submit([ImagePair(png(), png())])
    assert isinstance(wrong, ItemError) and "clipscore scores prompts (score_text), not image pairs" in str(wrong)
    [wrong] = await consistency.coalescer.submit([TextImage(png(), "a cup of coffee")])
    assert isinstance(wrong, ItemError) and "consistency scores image pairs (score_pair), not prompts" in str(wrong)
