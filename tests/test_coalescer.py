"""The scorer deployments' coalescer: one forward pass at a time over all waiting groups, and
failures that stay with the input that caused them."""

import asyncio

import pytest

from deployments.scorer import Coalescer, ItemError


async def test_groups_waiting_during_a_pass_are_merged_up_to_the_limit():
    passes = []
    release = asyncio.Event()

    async def forward(items):
        passes.append(list(items))
        if len(passes) == 1:
            await release.wait()  # the model is busy while more groups arrive
        return [item * 10 for item in items]

    coalescer = Coalescer(forward, max_items=5)
    first = asyncio.create_task(coalescer.submit([1]))
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(coalescer.submit(group)) for group in ([2, 3], [4], [5, 6], [7])]
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(first, *waiting)
    assert results == [[10], [20, 30], [40], [50, 60], [70]]
    # [2, 3] + [4] fit in 5 items; [5, 6] would make 5 too and joins; [7] is the next pass.
    assert passes == [[1], [2, 3, 4, 5, 6], [7]]


async def test_a_group_is_never_split_and_the_worker_survives_a_failed_pass():
    async def forward(items):
        if 99 in items:
            raise ValueError("bad image")
        return items

    coalescer = Coalescer(forward, max_items=2)
    assert await coalescer.submit([1, 2, 3]) == [1, 2, 3]  # a group larger than the limit runs whole
    [failed] = await coalescer.submit([99])
    assert isinstance(failed, ItemError) and "bad image" in str(failed)
    assert await coalescer.submit([4]) == [4]  # the worker survives a failed pass


async def test_a_bad_item_fails_only_its_own_caller_and_the_error_names_it():
    """Three callers' groups merged into one pass; one group holds a bad item among good ones.
    Before: the merged pass raised and every caller got the error. Now the other groups are
    rerun on their own and succeed, and only the bad item's slot carries an error naming it."""
    passes = []
    release = asyncio.Event()

    async def forward(items):
        passes.append(list(items))
        if len(passes) == 1:
            await release.wait()
        if "bad" in items:
            raise ValueError("cannot identify image file")
        return [f"score:{item}" for item in items]

    coalescer = Coalescer(forward, max_items=16, describe=lambda item: f"image {item!r} (8x8 px)")
    busy = asyncio.create_task(coalescer.submit(["warm"]))
    await asyncio.sleep(0.01)
    groups = (["a1", "a2"], ["b1", "bad", "b3"], ["c1"])
    waiting = [asyncio.create_task(coalescer.submit(list(group))) for group in groups]
    await asyncio.sleep(0.01)
    release.set()
    await busy
    a, b, c = await asyncio.gather(*waiting)
    assert a == ["score:a1", "score:a2"] and c == ["score:c1"]
    assert b[0] == "score:b1" and b[2] == "score:b3"
    assert isinstance(b[1], ItemError)
    message = str(b[1])
    assert "item 2 of 3" in message and "image 'bad' (8x8 px)" in message and "cannot identify image file" in message
    assert isinstance(b[1].__cause__, ValueError)
    assert ["a1", "a2", "b1", "bad", "b3", "c1"] in passes  # they were merged first


async def test_groups_of_cancelled_callers_are_not_computed():
    """A caller that went away while its group waited for the model costs no forward pass.
    Before: its group was merged into the next pass anyway."""
    passes = []
    release = asyncio.Event()

    async def forward(items):
        passes.append(list(items))
        if len(passes) == 1:
            await release.wait()
        return items

    coalescer = Coalescer(forward, max_items=16)
    busy = asyncio.create_task(coalescer.submit([0]))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(coalescer.submit([1, 2]))
    kept = asyncio.create_task(coalescer.submit([3]))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await kept == [3] and await busy == [0]
    assert gone.cancelled()
    assert passes == [[0], [3]]


async def test_cancelled_groups_are_not_rerun_after_a_failed_pass():
    passes = []

    async def forward(items):
        passes.append(list(items))
        if "bad" in items:
            # The caller of ["x"] goes away while the merged pass runs.
            victim.cancel()
            await asyncio.sleep(0)
            raise ValueError("broken")
        return items

    coalescer = Coalescer(forward, max_items=16)
    first = asyncio.create_task(coalescer.submit(["first"]))
    victim = asyncio.create_task(coalescer.submit(["x"]))
    bad = asyncio.create_task(coalescer.submit(["bad"]))
    assert await first == ["first"]
    [error] = await bad
    assert isinstance(error, ItemError)
    assert victim.cancelled()
    assert passes[0] == ["first", "x", "bad"]  # merged, then rerun group by group:
    assert ["x"] not in passes  # the cancelled caller's group was not rerun alone


def test_scorer_deployment_options_follow_from_the_typed_serving_config():
    """max_ongoing_requests lets MAX_PENDING_BATCHES full Serve batches wait for the model; it
    is derived from max_batch_size, and the class default obeys the same rule."""
    from pydantic import ValidationError

    from deployments.scorer import MAX_PENDING_BATCHES, ScorerDeployment, scorer_deployment_options

    assert MAX_PENDING_BATCHES >= 8
    for size in (1, 16, 64):
        options = scorer_deployment_options({"batch": {"max_batch_size": size, "batch_wait_timeout_s": 0.02}})
        assert options["max_ongoing_requests"] >= 8 * size
        assert options["user_config"]["max_batch_size"] == size
    default = scorer_deployment_options()
    assert ScorerDeployment.max_ongoing_requests == default["max_ongoing_requests"] >= 8 * default["user_config"]["max_batch_size"]
    gpu = scorer_deployment_options({"num_cpus": 2, "num_gpus": 0.25, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    assert gpu["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.25} and gpu["autoscaling_config"]["max_replicas"] == 3
    assert scorer_deployment_options({"num_replicas": 2})["num_replicas"] == 2
    with pytest.raises(ValidationError, match="max_batch_sise"):
        scorer_deployment_options({"batch": {"max_batch_sise": 8}})
    with pytest.raises(ValidationError, match="num_gpu\\b"):
        scorer_deployment_options({"num_gpu": 1})
    with pytest.raises(ValidationError, match="not both"):
        scorer_deployment_options({"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}})
    with pytest.raises(ValidationError):  # Serve's own rule, checked before anything is deployed
        scorer_deployment_options({"autoscaling_config": {"min_replicas": 4, "max_replicas": 2}})


def test_the_app_derives_each_scorers_deployment_options_from_args():
    """Before: batch sizes and max_ongoing_requests were hand-written per scorer in the YAML's
    `deployments:` list, with the 8x rule only in a comment."""
    from deployments.app import SCORER_DEPLOYMENTS, build
    from deployments.args import AppArgs

    args = AppArgs.model_validate({"scorers": {
        "vqascore": {"batch": {"max_batch_size": 4}, "num_gpus": 0.5, "threads": 3},
        "clipscore": {"num_replicas": 2},
    }})
    scorers = build(args)._bound_deployment.init_kwargs["scorers"]  # the ingress's scorer handles
    bound = {d._bound_deployment.name: d._bound_deployment for d in [*scorers.per_model.values(), scorers.consistency]}
    assert set(bound) == set(SCORER_DEPLOYMENTS.values())
    vqa = bound["VQAScore"]
    assert (vqa.max_ongoing_requests, vqa.user_config["max_batch_size"], vqa.ray_actor_options["num_gpus"]) == (32, 4, 0.5)
    assert vqa.init_kwargs["threads"] == 3  # torch threads, set in the replica
    assert bound["CLIPScore"].num_replicas == 2
    assert bound["PickScore"].max_ongoing_requests == 8 * bound["PickScore"].user_config["max_batch_size"]


def test_shipped_serve_configs_leave_the_scorers_to_the_typed_args():
    """A YAML `deployments:` entry overrides the code's options: the shipped configs have none
    for the scorers, and their `args.scorers` validate."""
    from pathlib import Path

    import yaml

    from deployments.app import SCORER_DEPLOYMENTS
    from deployments.args import AppArgs

    paths = sorted(Path(__file__).resolve().parents[1].glob("serve_config*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        for app in yaml.safe_load(path.read_text())["applications"]:
            named = {entry["name"] for entry in app.get("deployments", [])}
            assert not named & set(SCORER_DEPLOYMENTS.values()), path.name
            assert "scorers" in app["args"], path.name
            AppArgs.model_validate(app["args"])


def test_provider_diffusers_binds_the_self_hosted_generator_under_the_generator_name():
    from deployments.app import build
    from deployments.args import AppArgs

    api = build(AppArgs())._bound_deployment.init_kwargs["generator"]._bound_deployment
    assert (api.name, api.func_or_class.__name__) == ("ImageGenerator", "ImageGenerator")
    args = AppArgs.model_validate({"pipeline": {"images": {"provider": "diffusers", "diffusion": {"max_batch_size": 24}}}})
    own = build(args)._bound_deployment.init_kwargs["generator"]._bound_deployment
    assert own.name == "ImageGenerator" and own.func_or_class.__name__ == "DiffusionGenerator"
    assert own.max_ongoing_requests == 48 and own.init_kwargs["settings"].max_batch_size == 24
