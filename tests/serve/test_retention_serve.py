"""Retention while the app runs: the retention loop of the ingress's job worker (`JobWorker._retention_loop`,
pipeline.jobs.retention.sweep) removes a finished generation's trace files after `traces_s`, then
its images, its uploaded original, its scenes and its row after `generations_s`; status and
image links then answer 404.

The app here is an ingress of its own (route prefix /retention) with its own job store and
directories and short retention periods; it runs its jobs on the session app's generator,
agents and scorers through their handles, so nothing else is loaded for it.
"""

from __future__ import annotations

import io
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from PIL import Image

from pipeline.jobs.store import JobStore
from pipeline.storage.factory import open_store
from tests.serve.conftest import auth, wait_done

pytestmark = pytest.mark.serve

TRACES_S, GENERATIONS_S = 6.0, 26.0  # the gap leaves a slow machine room to see the first stage alone
REQUEST = {"target_duration": 9, "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}


def wait_for(predicate, timeout_s: float, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


@pytest.fixture
def retention_app(ray_cluster, offline_app, app_args, tmp_path):
    from ray import serve

    from deployments.adapters import ScorerHandles
    from deployments.app import SCORER_DEPLOYMENTS
    from deployments.ingress import Ingress

    pipeline = app_args.pipeline.model_copy(update={
        "artifacts_dir": str(tmp_path / "artifacts"),
        "traces": app_args.pipeline.traces.model_copy(update={"root": str(tmp_path / "traces"), "keep": True}),
    })
    args = app_args.model_copy(update={
        "database_url": f"sqlite:///{tmp_path / 'jobs.db'}", "pipeline": pipeline,
        "uploads": app_args.uploads.model_copy(update={"max_side": 64}),  # the 80x45 upload keeps its original
        "retention": app_args.retention.model_copy(update={"traces_s": TRACES_S, "generations_s": GENERATIONS_S,
                                                           "interval_s": 0.5}),
    })

    def handle(name: str):
        return serve.get_deployment_handle(name, app_name="sceneref")

    scorers = ScorerHandles(
        layout="separate", consistency=handle("Consistency"),
        per_model={key: handle(name) for key, name in SCORER_DEPLOYMENTS.items() if key != "consistency"},
    )
    app = Ingress.options(name="RetentionIngress", num_replicas=1, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0}).bind(
        scorers=scorers, generator=handle("ImageGenerator"), agents=handle("PromptAgents"), args=args
    )
    serve.run(app, name="retention", route_prefix="/retention")
    yield f"{ray_cluster['http']}/retention", args
    serve.delete("retention")


def test_retention_loop_removes_expired_generations_while_the_app_runs(retention_app):
    base, args = retention_app
    headers = auth("retention")
    store = JobStore(args.database_url)
    artifacts = open_store(args.pipeline.artifacts_dir)
    traces = open_store(args.pipeline.traces.root)
    replies = [
        httpx.post(f"{base}/api/generate", json={"prompt": "Artisan coffee that starts your morning right", **REQUEST},
                   headers=headers, timeout=30),
        httpx.post(f"{base}/api/generate-with-image", data={"prompt": "Fresh juice for a sunny afternoon picnic",
                                                            **{k: str(v) for k, v in REQUEST.items()}},
                   files={"image": ("mine.jpg", jpeg(), "image/jpeg")}, headers=headers, timeout=30),
    ]
    assert [r.status_code for r in replies] == [202, 202], [r.text for r in replies]
    ids = [r.json()["generation_id"] for r in replies]

    seen: dict[str, dict] = {}
    for gid in ids:
        status = wait_done(base, gid, headers, timeout_s=300)
        assert status["status"] == "completed", status["error"]
        # Right after it finished, everything it stored is there (traces kept: `keep: true`).
        record = store.get(gid)
        seen[gid] = {
            "finished_at": record.finished_at,
            "artifacts": artifacts.list(f"{gid}/"),
            "traces": traces.list(f"{gid}/"),
            "image_url": status["storyboard_plan"]["scenes"][1]["reference_image_url"],
        }
        assert seen[gid]["artifacts"] and seen[gid]["traces"], seen[gid]
        assert httpx.get(seen[gid]["image_url"], timeout=10).status_code == 200
    upload_original = [key for key in seen[ids[1]]["artifacts"] if "/upload/original" in key]
    assert upload_original, seen[ids[1]]["artifacts"]

    # First stage: the trace files go, never before traces_s; images and rows stay.
    for gid in ids:
        wait_for(lambda: not traces.list(f"{gid}/"), 120, what=f"{gid}'s traces removed")
        gone_at = datetime.now(timezone.utc)
        record = store.get(gid)
        assert gone_at >= seen[gid]["finished_at"] + timedelta(seconds=TRACES_S)
        assert record is not None and record.traces_removed_at is not None, "the row went with the traces"
        assert record.traces_removed_at >= record.finished_at + timedelta(seconds=TRACES_S)
        assert artifacts.list(f"{gid}/") == seen[gid]["artifacts"]
        assert httpx.get(f"{base}/api/status/{gid}", headers=headers, timeout=10).status_code == 200

    # Second stage: images, the uploaded original, scenes, events and the row go together.
    for gid in ids:
        wait_for(lambda: store.get(gid) is None, 120, what=f"{gid}'s row removed")
        gone_at = datetime.now(timezone.utc)
        assert gone_at >= seen[gid]["finished_at"] + timedelta(seconds=GENERATIONS_S)
        assert artifacts.list(f"{gid}/") == [] and traces.list(f"{gid}/") == []
        assert store.scenes(gid) == []
        assert httpx.get(f"{base}/api/status/{gid}", headers=headers, timeout=10).status_code == 404
        assert httpx.get(seen[gid]["image_url"], timeout=10).status_code == 404
    assert store.generations("retention") == []
    store.close()


def jpeg() -> bytes:
    """A JPEG upload: its original is kept beside the PNG the pipeline uses."""
    out = io.BytesIO()
    Image.new("RGB", (80, 45), (200, 120, 40)).save(out, format="JPEG")
    return out.getvalue()
