"""The diffusers generator deployment: its methods as a plain class, then under Serve on the
session's local Ray, in an app of its own ("diffusion"), driven through HandleImages as the
runner drives any image deployment. The replica builds the tiny random-weight pipeline itself
(offline_models_dir), as the offline config would have it do."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from pipeline.providers.base import ProviderError

APP = "diffusion"
SETTINGS = {"size": "64x48", "steps": 2, "strength": 0.5, "guidance_scale": 2.0, "seed": 7,
            "device": "cpu", "dtype": "float32", "max_batch_size": 8, "batch_wait_timeout_s": 0.3}


def png(colour=(200, 120, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 54), colour).save(out, format="PNG")
    return out.getvalue()


async def test_the_batch_method_answers_each_request_on_the_image_generator_wire(tmp_path):
    from deployments.diffusion import DiffusionGenerator

    cls = DiffusionGenerator.func_or_class
    replica = cls(SETTINGS, offline_models_dir=str(tmp_path), threads=1)
    assert (tmp_path / "diffusion" / "model_index.json").is_file()
    answers = await cls._generate_batch.__wrapped__(
        replica, [("scene one", None, 1), ("scene two", png(), 1), ("scene two", b"junk", 2), ("scene one", None, 2)]
    )
    assert [a.get("metadata", {}).get("seed") for a in answers] == [8, 8, None, 9]
    assert answers[1]["metadata"]["operation"] == "img2img" and answers[1]["data"][:4] == b"\x89PNG"
    assert answers[2] == {"error": answers[2]["error"], "retryable": False, "status_code": None}
    assert "reference is not a usable image" in answers[2]["error"]
    assert replica.engine.calls == [("text2img", 2), ("img2img", 1)] and replica.recent_batch_sizes() == [4]
    replica.engine.healthy_at = float("-inf")
    await replica.check_health()
    assert replica.health_probes() == 1


@pytest.fixture(scope="module")
def generator(ray_cluster, tmp_path_factory):
    from ray import serve

    from deployments.diffusion import DiffusionGenerator

    models = tmp_path_factory.mktemp("diffusion-models")
    deployment = DiffusionGenerator.options(
        name="DiffusionGenerator", ray_actor_options={"num_cpus": 0.5, "num_gpus": 0}
    )
    serve.run(deployment.bind(SETTINGS, str(models), 1), name=APP, route_prefix=None)
    yield serve.get_deployment_handle("DiffusionGenerator", app_name=APP)
    serve.delete(APP)


@pytest.mark.serve
def test_variations_of_several_scenes_are_batched_with_their_own_seeds(generator):
    from deployments.adapters import HandleImages

    images = HandleImages(generator)

    async def two_scenes_at_once():
        calls = [images.generate("scene one: a lamp on a desk", reference=None, variation=v) for v in (1, 2, 3)]
        calls += [images.generate("scene two: the lamp at night", reference=png(), variation=v) for v in (1, 2, 3)]
        return await asyncio.gather(*calls)

    before = len(generator.recent_batch_sizes.remote().result(timeout_s=60))
    results = asyncio.run(two_scenes_at_once())
    assert [r.metadata["seed"] for r in results] == [8, 9, 10, 8, 9, 10]
    assert [r.metadata["operation"] for r in results] == ["text2img"] * 3 + ["img2img"] * 3
    assert len({r.data for r in results}) == 6
    sizes = generator.recent_batch_sizes.remote().result(timeout_s=60)[before:]
    assert max(sizes) > 1 and sum(sizes) == 6, sizes


@pytest.mark.serve
def test_through_serve_the_same_request_gives_the_same_png_and_errors_keep_their_kind(generator):
    from deployments.adapters import HandleImages

    images = HandleImages(generator)
    first = asyncio.run(images.generate("scene one: a lamp on a desk", reference=None, variation=4))
    again = asyncio.run(images.generate("scene one: a lamp on a desk", reference=None, variation=4))
    assert first.metadata["seed"] == again.metadata["seed"] == 11 and first.data == again.data
    with pytest.raises(ProviderError, match="reference is not a usable image") as error:
        asyncio.run(images.generate("scene two", reference=b"junk", variation=1))
    assert error.value.retryable is False
