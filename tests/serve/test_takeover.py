"""Jobs survive their runner: with two ingress replicas, a job whose replica is killed (SIGKILL,
as a crashed node) is taken over by another replica once its lease expires, at its next
scene; the scenes already checkpointed, and the user's image as scene 1, stay byte for byte."""

from __future__ import annotations

import io
import os
import signal
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from PIL import Image

from pipeline.storage.factory import open_store
from pipeline.jobs.store import JobStore
from pipeline.schemas import GenerationRequest
from tests.serve.conftest import auth, wait_done, wait_healthy

pytestmark = pytest.mark.serve

LONG = {"prompt": "A lighthouse keeper's long day, from dawn to the night storm", "target_duration": 30,
        "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}


def wait_for(predicate, timeout_s: float = 120, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")


def holder_pid(holder: str) -> int:
    """Ingress lease holders are `ingress-{host}-{pid}-{nonce}`."""
    return int(holder.rsplit("-", 2)[1])


def test_killed_runner_is_taken_over_and_keeps_its_scenes(offline_app, app_args):
    headers = auth("frank")
    store = JobStore(app_args.database_url)
    artifacts = open_store(app_args.pipeline.artifacts_dir, app_args.pipeline.s3)
    reply = httpx.post(f"{offline_app}/api/generate", json=LONG, headers=headers, timeout=30)
    assert reply.status_code == 202, reply.text
    generation_id = reply.json()["generation_id"]

    # Let it checkpoint two scenes, then kill the process that holds its lease.
    wait_for(lambda: len(store.scenes(generation_id)) >= 2)
    record = store.get(generation_id)
    assert record.status == "running" and record.lease_holder.startswith("ingress-")
    before = {s.scene_number: (s, artifacts.get(s.reference_image_key)) for s in store.scenes(generation_id)}
    killed = holder_pid(record.lease_holder)
    os.kill(killed, signal.SIGKILL)
    killed_at = time.monotonic()

    # Another replica (the survivor, or Serve's replacement) claims it, never before the dead
    # runner's lease expired: a claim sets expiry = claim time + lease_s, and the dead runner's
    # last expiry is at least the one read before the kill.
    taken = wait_for(lambda: (r := store.get(generation_id)).lease_holder not in (None, record.lease_holder) and r,
                     every_s=0.05)
    takeover_s = time.monotonic() - killed_at
    assert holder_pid(taken.lease_holder) != killed
    assert taken.lease_token > record.lease_token
    claimed_at = taken.lease_expires_at - timedelta(seconds=app_args.jobs.lease_s)
    assert claimed_at >= record.lease_expires_at, "taken over while the dead runner's lease was still valid"

    wait_healthy(offline_app)
    status = wait_done(offline_app, generation_id, headers, timeout_s=400)
    assert status["status"] == "completed", status["error"]
    after = {s.scene_number: s for s in store.scenes(generation_id)}
    assert len(after) == len(status["storyboard_plan"]["scenes"])
    for number, (scene, data) in before.items():  # checkpointed scenes unchanged, byte for byte
        assert after[number] == scene
        assert artifacts.get(after[number].reference_image_key) == data
    print(f"takeover after kill: {takeover_s:.1f} s (lease {app_args.jobs.lease_s} s)")
    store.close()


def test_user_image_survives_a_runner_that_died_before_scene_one(offline_app, app_args):
    """The submission persisted the image; its runner died before checkpointing anything. The
    job resumed elsewhere uses exactly that image as scene 1."""
    headers = auth("grace")
    store = JobStore(app_args.database_url)
    artifacts = open_store(app_args.pipeline.artifacts_dir, app_args.pipeline.s3)
    image = io.BytesIO()
    Image.new("RGB", (96, 54), (30, 90, 200)).save(image, format="PNG")
    generation_id = uuid.uuid4().hex
    key = artifacts.put(f"{generation_id}/scene_1/user_reference.png", image.getvalue())
    request = GenerationRequest(prompt="Fresh juice for a sunny afternoon picnic", target_duration=9,
                                advanced_image_num_variations=2, advanced_image_max_enhancement_iterations=1)
    store.create(generation_id, "grace", request.model_dump(mode="json"), offline=True, reference_key=key)
    dead = store.claim("ingress-deadhost-1-dead", 3, generation_id=generation_id)  # a runner that never renews
    assert dead is not None

    status = wait_done(offline_app, generation_id, headers, timeout_s=300)
    assert status["status"] == "completed", status["error"]
    first = status["storyboard_plan"]["scenes"][0]
    assert first["user_provided"] is True
    assert store.scenes(generation_id)[0].reference_image_key == key
    served = httpx.get(first["reference_image_url"], timeout=10).content
    assert served == image.getvalue()
    store.close()
