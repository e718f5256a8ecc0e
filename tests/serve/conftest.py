"""One local Ray cluster and one offline sceneref app for the whole test session."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

SECRET = "test-secret-" + "x" * 40
AUDIENCE = "sceneref-api"
ENV = {"RAY_AUTH_MODE": "disabled", "SCENEREF_JWT_SECRET": SECRET, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.update(ENV)
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        address="local",
        num_cpus=32,  # logical slots for the session app and the apps tests deploy beside it (2 real cores)
        include_dashboard=False,
        runtime_env={"env_vars": ENV},
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"http": f"http://127.0.0.1:{port}", "gcs": ray.get_runtime_context().gcs_address}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from scorers.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("offline-models")
    build_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def app_args(tmp_path_factory, tiny_models, ray_cluster):
    from deployments.args import AppArgs

    out = tmp_path_factory.mktemp("serve-out")
    return AppArgs.model_validate(
        {
            "database_url": f"sqlite:///{out / 'jobs.db'}",
            "offline_models_dir": str(tiny_models),
            "allow_random_weights": True,  # the tiny models: every status says offline
            "pipeline": {
                "llm": {"provider": "offline", "model": "offline-agents"},
                "images": {"provider": "offline", "model": "offline-procedural", "size": "256x144"},
                "scoring": {"device": "cpu", "dtype": "float32"},
                "traces": {"root": str(out / "traces"), "keep": True},
                "artifacts_dir": str(out / "artifacts"),
            },
            "uploads": {"max_bytes": 2_000_000, "max_pixels": 4_000_000},
            "jobs": {"lease_s": 4, "poll_s": 0.5},
            "limits": {"max_active_per_user": 3, "max_submitted_per_window": 50, "max_unfinished": 100},
            "auth": {"mode": "hs256", "audience": AUDIENCE},
            # Links in answers come from here, never from the request's Host header.
            "public_base_url": ray_cluster["http"],
        }
    )


CPU_ONLY = {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0}}


@pytest.fixture(scope="session")
def offline_app(ray_cluster, app_args):
    """The offline app, deployed once; tests talk to it over HTTP and through handles."""
    from ray import serve

    from deployments.app import build

    # Two ingress replicas, as in serve_config.offline.yaml: every HTTP test runs on the shared
    # job store with leases.
    serve.run(build(app_args, {"num_replicas": 2}), name="sceneref", route_prefix="/", blocking=False)
    wait_healthy(ray_cluster["http"])
    return ray_cluster["http"]


def wait_healthy(base: str, timeout_s: float = 180) -> None:
    """Until the ingress answers and every deployment a generation needs has a live replica
    (`/api/ready`): before that a submission is refused with 503."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/api/ready did not answer 200 within {timeout_s} s")


def token(sub: str = "alice", **kwargs) -> str:
    from deployments.auth import mint_token

    return mint_token(SECRET, sub, audience=AUDIENCE, **kwargs)


def auth(sub: str = "alice") -> dict:
    return {"Authorization": f"Bearer {token(sub)}"}


def wait_done(base: str, generation_id: str, headers: dict, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/api/status/{generation_id}", headers=headers, timeout=10).json()
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"generation {generation_id} not done after {timeout_s} s: {status}")
