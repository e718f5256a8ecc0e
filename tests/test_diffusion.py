"""The self-hosted diffusers generator without Ray: a tiny random-weight pipeline built with the
real classes, saved, and loaded back through the same code as a real checkpoint."""

from __future__ import annotations

import asyncio
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from pipeline.providers.diffusers.engine import (
    DiffusionEngine,
    DiffusionImages,
    DiffusionRequest,
    UnhealthyGenerator,
)
from pipeline.providers.diffusers.settings import DiffusionSettings
from pipeline.providers.diffusers.loading import set_scheduler
from pipeline.providers.diffusers.tiny import build_tiny_pipeline
from pipeline.providers.base import GeneratedImage, ProviderError
from scorers.base import ModelNotFoundError, RandomWeightsError

SIZE = "64x48"


def png(size=(80, 80), colour=(200, 120, 40)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.putdata([(x * 3 % 256, y * 5 % 256, colour[2]) for y in range(size[1]) for x in range(size[0])])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("diffusion") / "tiny")


def settings(tiny, **changes) -> DiffusionSettings:
    base = {"model": str(tiny), "size": SIZE, "steps": 2, "strength": 0.5, "guidance_scale": 2.0, "seed": 7,
            "device": "cpu", "dtype": "float32"}
    return DiffusionSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def engine(tiny):
    return DiffusionEngine(settings(tiny))


def test_settings_refuse_what_would_fail_or_mislead_later():
    with pytest.raises(ValidationError, match="multiples of 16"):
        DiffusionSettings(size="1000x560")
    with pytest.raises(ValidationError, match="runs no image-to-image step"):
        DiffusionSettings(steps=1, strength=0.5)
    with pytest.raises(ValidationError, match="extra"):
        DiffusionSettings(sampler="euler")
    assert DiffusionSettings().dimensions == (1024, 576)


def test_the_tiny_pipeline_loads_through_the_real_loading_code(engine):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    assert isinstance(engine.text2img, StableDiffusionPipeline)
    assert isinstance(engine.img2img, StableDiffusionImg2ImgPipeline)
    assert engine.img2img.unet is engine.text2img.unet  # one copy of the weights
    assert engine.random_weights and engine.scheduler == "EulerDiscreteScheduler"


def test_with_a_seed_the_same_request_gives_the_same_png(engine):
    [first] = engine.generate([DiffusionRequest("a red bicycle at dusk", 1)])
    [again] = engine.generate([DiffusionRequest("a red bicycle at dusk", 1)])
    assert isinstance(first, GeneratedImage) and first.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert again.data == first.data
    twice = engine.generate([DiffusionRequest("a red bicycle at dusk", 1)] * 2)
    assert twice[0].data == twice[1].data  # same seed within one batch too
    assert first.metadata["seed"] == 8 and first.metadata["variation"] == 1
    assert Image.open(io.BytesIO(first.data)).size == (64, 48)


def test_different_seeds_give_different_images_and_each_image_depends_on_its_own_seed(engine):
    batch = engine.generate([DiffusionRequest("a red bicycle at dusk", v) for v in (1, 2, 3)])
    assert [image.metadata["seed"] for image in batch] == [8, 9, 10]
    assert len({image.data for image in batch}) == 3
    assert all(image.metadata["batch_size"] == 3 for image in batch)
    [alone] = engine.generate([DiffusionRequest("a red bicycle at dusk", 2)])
    # Its own generator gives the same noise whatever else is in the batch (batched kernels
    # may round differently in the last bit, hence one level of tolerance).
    assert np.abs(pixels(alone.data) - pixels(batch[1].data)).max() <= 1


def test_text_and_image_requests_run_as_one_call_each(engine):
    requests = [
        DiffusionRequest("scene one", 1), DiffusionRequest("scene two", 1, reference=png()),
        DiffusionRequest("scene one", 2), DiffusionRequest("scene two", 2, reference=png()),
        DiffusionRequest("another job's scene", 4),
    ]
    engine.calls.clear()
    results = engine.generate(requests)
    assert engine.calls == [("text2img", 3), ("img2img", 2)]
    assert [r.metadata["operation"] for r in results] == ["text2img", "img2img", "text2img", "img2img", "text2img"]
    assert results[1].metadata["strength"] == 0.5 and results[1].metadata["reference_used"]
    assert results[0].metadata["strength"] is None


def test_image_to_image_depends_on_the_reference_fitted_to_the_output_size(engine):
    wide, square = png((160, 90), (10, 200, 30)), png((50, 50), (250, 20, 90))
    a, b = engine.generate([DiffusionRequest("scene two", 1, reference=wide), DiffusionRequest("scene two", 1, reference=square)])
    assert a.metadata["seed"] == b.metadata["seed"] and a.data != b.data
    assert Image.open(io.BytesIO(a.data)).size == Image.open(io.BytesIO(b.data)).size == (64, 48)


def test_a_bad_reference_fails_only_its_own_request(engine):
    good, bad, chained = engine.generate([
        DiffusionRequest("scene one", 1), DiffusionRequest("scene two", 1, reference=b"not an image"),
        DiffusionRequest("scene two", 2, reference=png()),
    ])
    assert isinstance(good, GeneratedImage) and isinstance(chained, GeneratedImage)
    assert isinstance(bad, ProviderError) and "reference is not a usable image" in str(bad) and not bad.retryable


def test_a_random_seed_is_recorded_and_makes_the_image_again(tiny):
    unseeded = DiffusionEngine(settings(tiny, seed=None))
    [first] = unseeded.generate([DiffusionRequest("a lighthouse", 0)])
    [second] = unseeded.generate([DiffusionRequest("a lighthouse", 0)])
    assert first.metadata["seed"] != second.metadata["seed"] and first.data != second.data
    seed = first.metadata["seed"]  # variation 0: the recorded seed is the base seed itself
    [again] = DiffusionEngine(settings(tiny, seed=seed)).generate([DiffusionRequest("a lighthouse", 0)])
    assert again.metadata["seed"] == seed and again.data == first.data


def test_batches_are_cut_at_max_batch_size_and_the_scheduler_is_a_setting(tiny):
    small = DiffusionEngine(settings(tiny, max_batch_size=2, scheduler="DDIMScheduler"))
    results = small.generate([DiffusionRequest("scene", v) for v in range(1, 6)])
    assert small.calls == [("text2img", 2), ("text2img", 2), ("text2img", 1)]
    assert {r.metadata["scheduler"] for r in results} == {"DDIMScheduler"}
    assert type(small.img2img.scheduler).__name__ == "DDIMScheduler"


def test_a_text_length_the_pipeline_does_not_take_is_refused_not_ignored(tiny):
    with pytest.raises(ValueError, match="StableDiffusionPipeline does not take max_sequence_length"):
        DiffusionEngine(settings(tiny, max_sequence_length=256))


def test_a_scheduler_the_model_cannot_use_is_refused(engine):
    from diffusers import AutoPipelineForText2Image

    copy = AutoPipelineForText2Image.from_pipe(engine.text2img)  # shares modules, not the engine's attribute
    with pytest.raises(ValueError, match="does not fit this model"):
        set_scheduler(copy, "FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ValueError, match="not a scheduler class"):
        set_scheduler(copy, "NoSuchScheduler")
    set_scheduler(copy, "DPMSolverMultistepScheduler")
    assert type(copy.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert engine.scheduler == "EulerDiscreteScheduler" == type(engine.text2img.scheduler).__name__


@pytest.mark.parametrize("component,weights", [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")])
def test_a_checkpoint_that_lacks_weights_is_refused_unless_allowed(tiny, tmp_path, component, weights):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "RANDOM_WEIGHTS").unlink()
    stored = load_file(broken / component / weights)
    dropped = sorted(stored)[0]
    del stored[dropped]
    save_file(stored, broken / component / weights)
    with pytest.raises(RandomWeightsError, match=f"lacks 1 weights.*{component}/{dropped}"):
        DiffusionEngine(settings(broken))
    assert not DiffusionEngine(settings(broken, allow_random_weights=True)).random_weights


def test_a_model_id_that_is_not_here_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="diffusion model not found: 'sceneref-tests/no-such-model'.*hf download"):
        DiffusionEngine(DiffusionSettings(model="sceneref-tests/no-such-model", device="cpu"))


def test_an_image_flagged_by_the_safety_checker_is_a_failed_variation(tiny, monkeypatch):
    checked = DiffusionEngine(settings(tiny))
    monkeypatch.setattr(checked.text2img, "run_safety_checker", lambda image, device, dtype: (image, [False, True]))
    kept, blocked = checked.generate([DiffusionRequest("scene", 1), DiffusionRequest("scene", 2)])
    assert isinstance(kept, GeneratedImage)
    assert isinstance(blocked, ProviderError) and "blocked by the model's safety checker" in str(blocked)
    assert "seed 9" in str(blocked)


def test_the_health_probe_runs_only_when_no_recent_generation_proves_health(tiny):
    checked = DiffusionEngine(settings(tiny, health_check_cache_s=60))
    checked.check_health()
    checked.check_health()
    assert checked.probes == 1
    checked.healthy_at = float("-inf")
    checked.generate([DiffusionRequest("scene", 1)])
    checked.check_health()
    assert checked.probes == 1


def test_broken_weights_fail_the_health_probe_and_give_no_image(tiny):
    broken = DiffusionEngine(settings(tiny, health_check_cache_s=0))
    with torch.no_grad():
        for parameter in broken.text2img.unet.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(UnhealthyGenerator, match="non-finite pixels"):
        broken.check_health()
    [result] = broken.generate([DiffusionRequest("scene", 1)])
    assert isinstance(result, ProviderError) and "non-finite pixels" in str(result)


async def test_the_in_process_provider_answers_like_every_image_provider(tiny, engine):
    provider = DiffusionImages(engine.settings, engine=engine)
    first, chained = await asyncio.gather(
        provider.generate("scene one", reference=None, variation=1),
        provider.generate("scene two", reference=png(), variation=1),
    )
    assert first.metadata["provider"] == "diffusers" and first.metadata["seed"] == 8
    assert chained.metadata["operation"] == "img2img"
    with pytest.raises(ProviderError, match="reference is not a usable image"):
        await provider.generate("scene two", reference=b"junk", variation=2)
