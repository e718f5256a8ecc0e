"""Failures made real under Serve, over HTTP: nothing is simulated by writing rows or files
the service would have written.

- The ingress replica that accepted an upload is SIGKILLed right after its 202: the job it
  persisted is finished by another replica, with scene 1 byte for byte the image the upload
  stored.
- A deployment a generation needs cannot start a replica (it asks for a resource no node has):
  a submission answers 503 with Retry-After naming that deployment, and nothing is stored.
"""

from __future__ import annotations

import io
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipeline.jobs.store import JobStore
from pipeline.storage.factory import open_store
from tests.serve.conftest import auth, wait_done, wait_healthy

pytestmark = pytest.mark.serve

FINISHED = ("completed", "failed", "cancelled")
FORM = {"prompt": "Fresh juice for a sunny afternoon picnic", "target_duration": "9",
        "advanced_image_num_variations": "2", "advanced_image_max_enhancement_iterations": "1"}


def wait_for(predicate, timeout_s: float, every_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def noisy_png(seed: int) -> bytes:
    """An image no other test uploads, so equal bytes mean this upload and nothing else."""
    out = io.BytesIO()
    Image.frombytes("RGB", (64, 36), random_bytes(64 * 36 * 3, seed)).save(out, format="PNG")
    return out.getvalue()


def random_bytes(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def replica_that_served(request_id: str, app: str, deployment: str) -> str | None:
    """The Serve replica id whose log names `request_id` (Serve tags every request's log lines,
    its access line included, with the request id, and logs each replica to its own file)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    for path in logs.glob(f"replica_{app}_{deployment}_*.log"):
        if request_id in path.read_text(errors="replace"):
            return path.name[len(f"replica_{app}_{deployment}_"):-len(".log")]
    return None


def replica_actor(app: str, deployment: str, replica_id: str) -> dict | None:
    """The live replica actor's pid and node, from Ray's actor table (the GCS)."""
    import ray

    name = f"SERVE_REPLICA::{app}#{deployment}#{replica_id}"
    for actor in ray._private.state.actors().values():
        if actor.get("Name") == name:
            return {"name": name, "pid": actor["Pid"], "state": actor.get("State")}
    return None


def holder_pid(holder: str) -> int:
    """Ingress lease holders are `ingress-{host}-{pid}-{nonce}`."""
    return int(holder.rsplit("-", 2)[1])


def test_ingress_killed_right_after_accepting_an_upload(offline_app, app_args):
    headers = auth("upload-crash")
    store = JobStore(app_args.database_url)
    artifacts = open_store(app_args.pipeline.artifacts_dir, app_args.pipeline.s3)
    request_id = uuid.uuid4().hex
    upload = noisy_png(7)
    reply = httpx.post(
        f"{offline_app}/api/generate-with-image", data=FORM, files={"image": ("mine.png", upload, "image/png")},
        headers={**headers, "X-Request-ID": request_id}, timeout=30,
    )
    assert reply.status_code == 202, reply.text
    generation_id = reply.json()["generation_id"]

    # Which replica answered: the one whose log holds this request's id. Kill that process.
    replica_id = wait_for(lambda: replica_that_served(request_id, "sceneref", "Ingress"), 30, what="the access log line")
    actor = replica_actor("sceneref", "Ingress", replica_id)
    assert actor is not None and actor["state"] == "ALIVE", actor
    os.kill(actor["pid"], signal.SIGKILL)
    killed = actor["pid"]

    # What the submission persisted before answering: the job row and the image it stored.
    record = store.get(generation_id)
    assert record is not None and record.reference_key
    stored = artifacts.get(record.reference_key)

    # A live replica (the other one, or Serve's replacement) runs it: seen holding its lease.
    def runner_elsewhere():
        r = store.get(generation_id)
        if r.lease_holder and holder_pid(r.lease_holder) != killed:
            return r
        assert r.status not in FINISHED, f"finished without a runner ever seen: {r.status} {r.error}"
        return None

    taken = wait_for(runner_elsewhere, 180, 0.05, "a live replica holding the job")
    assert taken.lease_token > record.lease_token
    wait_for(lambda: (a := replica_actor("sceneref", "Ingress", replica_id)) is None or a["state"] == "DEAD", 60,
             what="the killed replica gone from Ray's actor table or marked dead")

    wait_healthy(offline_app)
    status = wait_done(offline_app, generation_id, headers, timeout_s=300)
    assert status["status"] == "completed", status["error"]
    first = status["storyboard_plan"]["scenes"][0]
    assert first["user_provided"] is True
    scenes = store.scenes(generation_id)
    assert len(scenes) == len(status["storyboard_plan"]["scenes"]) == 3
    assert scenes[0].reference_image_key == record.reference_key
    assert artifacts.get(scenes[0].reference_image_key) == stored
    assert httpx.get(first["reference_image_url"], timeout=10).content == stored
    # ... and what it stored is the upload itself (a PNG is kept as sent, pixel for pixel).
    assert Image.open(io.BytesIO(stored)).tobytes() == Image.open(io.BytesIO(upload)).tobytes()
    store.close()


@pytest.fixture
def unready_app(ray_cluster, app_args, tmp_path):
    """A second app whose ImageGenerator asks for a resource no node has: its replica never
    starts; every other deployment it needs (colocated scoring, agents) runs."""
    from ray import serve
    from ray.serve.api import _run

    from deployments.app import scoring_deployments
    from deployments.args import ScorersServing
    from deployments.ingress import Ingress
    from deployments.providers import ImageGenerator, PromptAgents

    pipeline = app_args.pipeline.model_copy(update={
        "artifacts_dir": str(tmp_path / "artifacts"),
        "traces": app_args.pipeline.traces.model_copy(update={"root": str(tmp_path / "traces")}),
    })
    args = app_args.model_copy(update={
        "database_url": f"sqlite:///{tmp_path / 'jobs.db'}", "pipeline": pipeline,
        "scorers": ScorersServing(layout="colocated"),
    })
    never = ImageGenerator.options(ray_actor_options={"num_cpus": 0.1, "num_gpus": 0, "resources": {"sceneref_nowhere": 1}})
    app = Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0}).bind(
        scorers=scoring_deployments(args), generator=never.bind(settings=args.pipeline),
        agents=PromptAgents.bind(settings=args.pipeline), args=args,
    )
    _run(app, name="unready", route_prefix="/unready", _blocking=False)  # it never becomes RUNNING
    base = f"{ray_cluster['http']}/unready"

    def others_running():
        app_status = serve.status().applications.get("unready")
        if app_status is None:
            return False
        running = {n: d.replica_states.get("RUNNING", 0) for n, d in app_status.deployments.items()}
        return all(running.get(n, 0) >= 1 for n in ("Ingress", "Scoring", "PromptAgents")) and running

    running = wait_for(others_running, 240, 0.5, "the unready app's other deployments running")
    yield base, args, running
    serve.delete("unready")


def test_no_generator_replica_answers_503_and_stores_nothing(unready_app):
    base, args, running = unready_app
    assert running.get("ImageGenerator", 0) == 0
    headers = auth("no-generator")
    ready = httpx.get(f"{base}/api/ready", timeout=30)
    assert ready.status_code == 503, ready.text
    assert "ImageGenerator" in ready.json()["detail"]

    replies = [
        httpx.post(f"{base}/api/generate", json={"prompt": "Artisan coffee that starts your morning right",
                                                  "target_duration": 9}, headers=headers, timeout=30),
        httpx.post(f"{base}/api/generate-with-image", data=FORM, files={"image": ("a.png", noisy_png(8), "image/png")},
                   headers=headers, timeout=30),
    ]
    for reply in replies:
        assert reply.status_code == 503, reply.text
        assert int(reply.headers["Retry-After"]) > 0
        detail = reply.json()["detail"]
        assert "ImageGenerator" in detail, detail
        assert "Scoring" not in detail and "PromptAgents" not in detail, detail  # only what is missing

    store = JobStore(args.database_url)
    assert store.generations("no-generator") == [] and store.count_unfinished() == 0
    store.close()
    artifacts = open_store(args.pipeline.artifacts_dir)
    assert artifacts.list("") == []  # the upload was refused before it was stored
