"""A job-store outage under Serve: the offline app with two ingress replicas on a real
PostgreSQL, generations running, the server stopped for longer than the old checkpoint retries
(about 4 s) and started again. Every generation completes by itself, nothing is failed as an
internal error, and `/api/ready` answers 503 naming the job store while it is down."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.serve.conftest import CPU_ONLY, auth, wait_healthy

pytestmark = pytest.mark.serve

APP, PREFIX = "sceneref-pg-outage", "/pg-outage"
OUTAGE_S = 8.0
GENERATIONS = 3


@pytest.fixture(scope="module")
def pg_app(ray_cluster, app_args, tiny_models, postgres_outage_cluster):
    from ray import serve

    from deployments.app import build
    from deployments.args import AppArgs

    cluster = postgres_outage_cluster
    cluster.admin('CREATE DATABASE "serve_outage"')
    config = app_args.model_dump(mode="json", exclude_unset=True)
    config["database_url"] = cluster.url("serve_outage")
    config["jobs"] = {"lease_s": 10, "poll_s": 0.5, "store_outage_s": 60}
    args = AppArgs.model_validate(config)
    serve.run(build(args, {"num_replicas": 2, **CPU_ONLY}), name=APP, route_prefix=PREFIX, blocking=False)
    base = ray_cluster["http"] + PREFIX
    wait_healthy(base)
    yield base, cluster
    serve.delete(APP)


def statuses(base: str, ids: list[str], headers: dict) -> dict[str, dict] | None:
    """Every generation's status, or None while the API answers 503 (the store is away)."""
    out = {}
    for gid in ids:
        reply = httpx.get(f"{base}/api/status/{gid}", headers=headers, timeout=10)
        if reply.status_code == 503:
            return None
        assert reply.status_code == 200, reply.text
        out[gid] = reply.json()
    return out


def test_running_generations_wait_out_a_job_store_outage(pg_app):
    base, cluster = pg_app
    headers = auth("pat")
    ids = []
    for n in range(GENERATIONS):
        reply = httpx.post(f"{base}/api/generate", headers=headers, timeout=30, json={
            "prompt": f"Artisan coffee that starts your morning right, take {n}", "target_duration": 30,
            "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1,
        })
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["generation_id"])
    deadline = time.monotonic() + 120
    while True:  # every generation has its storyboard: all of them are mid-run
        now = statuses(base, ids, headers)
        assert now is not None
        if all(s["status"] == "running" and s["storyboard_plan"]["scenes"] for s in now.values()):
            break
        assert all(s["status"] in ("queued", "running") for s in now.values()), now  # none done before the outage
        assert time.monotonic() < deadline, now
        time.sleep(0.2)

    cluster.stop_server()
    stopped = time.monotonic()
    try:
        for _ in range(100):  # readiness is cached a moment: 503 within a few seconds (20 s at most)
            ready = httpx.get(f"{base}/api/ready", timeout=30)
            if ready.status_code != 200:
                break
            time.sleep(0.2)
        assert ready.status_code == 503 and ready.headers["Retry-After"], ready.text
        assert "job store cannot be reached" in ready.text
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
    finally:
        try:
            cluster.start_server()
        except subprocess.CalledProcessError:
            pass

    deadline = time.monotonic() + 300
    while True:
        now = statuses(base, ids, headers)
        if now is not None and all(s["status"] in ("completed", "failed", "cancelled") for s in now.values()):
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    assert {gid: (s["status"], s.get("error")) for gid, s in now.items()} == {gid: ("completed", None) for gid in ids}
    assert httpx.get(f"{base}/api/ready", timeout=30).status_code == 200
