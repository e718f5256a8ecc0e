"""A whole HTTP generation with no local state: jobs in a real PostgreSQL, images and trace
files in a real S3 server (SeaweedFS), two ingress replicas. The results are read back from the
stores themselves, not only through the API."""

from __future__ import annotations

import io

import boto3
import httpx
import pytest
from PIL import Image

from pipeline.jobs.store import JobStore
from testkit.seaweed import KEY_ENV, SECRET_ENV
from tests.serve.conftest import CPU_ONLY, auth, wait_done, wait_healthy

pytestmark = pytest.mark.serve

APP, PREFIX = "sceneref-cluster", "/cluster"


@pytest.fixture(scope="module")
def cluster_app(ray_cluster, app_args, tiny_models, postgres_cluster, s3_server, tmp_path_factory):
    import os

    from ray import serve

    from deployments.app import build
    from deployments.args import AppArgs

    database = "cluster_e2e"
    postgres_cluster.admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    postgres_cluster.admin(f'CREATE DATABASE "{database}"')
    url = f"s3://{s3_server.bucket}/e2e"
    config = app_args.model_dump(mode="json", exclude_unset=True)  # only what the session app sets
    config["database_url"] = postgres_cluster.url(database)
    config["pipeline"]["artifacts_dir"] = f"{url}/artifacts"
    config["pipeline"]["traces"]["root"] = f"{url}/traces"
    config["pipeline"]["s3"] = s3_server.settings().model_dump(mode="json")
    args = AppArgs.model_validate(config)
    env = {KEY_ENV: os.environ[KEY_ENV], SECRET_ENV: os.environ[SECRET_ENV]}
    options = {"num_replicas": 2, "ray_actor_options": {**CPU_ONLY["ray_actor_options"], "runtime_env": {"env_vars": env}}}
    serve.run(build(args, options), name=APP, route_prefix=PREFIX, blocking=False)
    base = ray_cluster["http"] + PREFIX
    wait_healthy(base)
    yield base, args
    serve.delete(APP)


def test_generation_with_postgres_and_object_storage(cluster_app, s3_server):
    base, args = cluster_app
    headers = auth("olivia")
    image = io.BytesIO()
    Image.new("RGB", (96, 54), (250, 180, 20)).save(image, format="PNG")
    reply = httpx.post(
        f"{base}/api/generate-with-image",
        data={"prompt": "Fresh juice for a sunny afternoon picnic", "target_duration": "9",
              "advanced_image_num_variations": "2", "advanced_image_max_enhancement_iterations": "1"},
        files={"image": ("mine.png", image.getvalue(), "image/png")}, headers=headers, timeout=30,
    )
    assert reply.status_code == 202, reply.text
    generation_id = reply.json()["generation_id"]
    status = wait_done(base, generation_id, headers, timeout_s=300)
    assert status["status"] == "completed", status["error"]
    scenes = status["storyboard_plan"]["scenes"]

    # The job and its scenes are in PostgreSQL.
    store = JobStore(args.database_url)
    assert store.engine.dialect.name == "postgresql"
    assert store.get(generation_id).status == "completed"
    rows = store.scenes(generation_id)
    assert [s.scene_number for s in rows] == [s["scene_number"] for s in scenes]
    store.close()

    # Every image and trace file is in the bucket, under the guide's names.
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"e2e/")
    keys = {o["Key"] for o in listed.get("Contents", [])}
    assert f"e2e/artifacts/{generation_id}/scene_1/user_reference.png" in keys
    for scene in rows[1:]:
        assert f"e2e/artifacts/{scene.reference_image_key}" in keys
        assert f"e2e/traces/{generation_id}/scene_{scene.scene_number}/selected_best.txt" in keys
        assert f"e2e/traces/{generation_id}/scene_{scene.scene_number}/00_original_prompt.txt" in keys
    for scene, row in zip(scenes, rows):  # the signed links read through the store
        served = httpx.get(scene["reference_image_url"], timeout=10)
        assert served.status_code == 200
        stored = s3.get_object(Bucket=s3_server.bucket, Key=f"e2e/artifacts/{row.reference_image_key}")["Body"].read()
        assert served.content == stored
    assert Image.open(io.BytesIO(served.content)).size

    # The trace routes read the bucket too, with the guide's names.
    files = httpx.get(f"{base}/api/generations/{generation_id}/traces", headers=headers, timeout=10).json()["files"]
    assert "scene_2/quality_scores.json" in files and "scene_2/image_1.png" in files
    png = httpx.get(f"{base}/api/generations/{generation_id}/traces/scene_2/image_1.png", headers=headers, timeout=10)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
