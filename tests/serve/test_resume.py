"""A crashed ingress replica loses nothing: its successor resumes unfinished jobs at their next
scene, keeping the scenes that were already checkpointed."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from pipeline.jobs import JobStore
from pipeline.schemas import GenerationRequest
from tests.serve.conftest import auth, wait_done, wait_healthy
from tests.serve.test_http import QUICK_START

pytestmark = pytest.mark.serve


def kill_ingress_replica() -> str:
    import ray

    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::sceneref#Ingress#")
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def test_killed_ingress_resumes_unfinished_jobs(offline_app, app_args):
    headers = auth("frank")
    # A finished generation to copy a real storyboard and scene 1 from.
    reply = httpx.post(f"{offline_app}/api/generate", json=QUICK_START[2], headers=headers, timeout=30)
    done = wait_done(offline_app, reply.json()["generation_id"], headers)
    store = JobStore(app_args.database_url)
    source = store.get(done["generation_id"])
    scene_one = store.scenes(done["generation_id"])[0]

    # Job A crashed after checkpointing scene 1; job B never started.
    partial, queued = uuid.uuid4().hex, uuid.uuid4().hex
    store.create(partial, "frank", source.request, offline=True)
    store.update(partial, status="running", progress=50, storyboard=source.storyboard)
    store.checkpoint_scene(partial, scene_one)
    request = GenerationRequest(prompt="A quiet bookshop on a rainy evening", target_duration=9,
                                advanced_image_num_variations=2, advanced_image_max_enhancement_iterations=1)
    store.create(queued, "frank", request.model_dump(mode="json"), offline=True)

    old = kill_ingress_replica()
    time.sleep(2)
    wait_healthy(offline_app)

    resumed = wait_done(offline_app, partial, headers)
    assert resumed["status"] == "completed" and resumed["error"] is None
    scenes = store.scenes(partial)
    assert len(scenes) == 3
    assert scenes[0] == scene_one  # kept, not regenerated
    assert scenes[1].reference_image_key.startswith(f"{partial}/scene_2/")
    assert wait_done(offline_app, queued, headers)["status"] == "completed"
    import ray

    assert old not in [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    store.close()
