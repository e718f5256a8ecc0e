"""Cost, time and metrics on the shared offline app: a generation's status carries its cost and time, and the
metrics its replicas recorded through Ray Serve's metrics API appear in the Prometheus text
that Ray's metrics agent exports on the node's metrics export port, with no user id or prompt
in any label."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.serve.conftest import auth, wait_done

PROMPT = "Metrics test: a copper kettle whistling on a winter morning"
EXPECTED = [
    r'ray_sceneref_generations_total\{[^}]*status="completed"',
    *(rf'ray_sceneref_stage_duration_seconds_count\{{[^}}]*stage="{stage}"' for stage in ("planning", "enhancement", "generation", "scoring")),
    r"ray_sceneref_enhancement_iterations_count",
    r'ray_sceneref_provider_calls_total\{[^}]*kind="handle"[^}]*outcome="ok"',
    r'ray_sceneref_images_generated_total\{[^}]*provider="offline"',
    r'ray_sceneref_scorer_batch_size_count\{[^}]*scorer="pickscore"',
    r'ray_sceneref_scorer_forward_seconds_count\{[^}]*scorer="aesthetic"',
    r"ray_sceneref_selected_quality_score_count",
    r'ray_sceneref_selected_quality_score_bucket\{[^}]*le="30(\.0)?"',  # the dashboard's threshold share
    r'ray_sceneref_llm_tokens_total\{[^}]*direction="input"[^}]*model="offline-agents"',
]


def metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape_until(url: str, patterns: list[str], timeout_s: float = 120) -> str:
    """Ray's agent exports what replicas recorded every few seconds: poll until all are there."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        if all(re.search(p, text) for p in patterns):
            return text
        time.sleep(2)
    missing = [p for p in patterns if not re.search(p, text)]
    pytest.fail(f"not exported within {timeout_s} s from {url}: {missing}")


def test_status_cost_and_timing_and_metrics_in_the_prometheus_export(offline_app):
    base, headers = offline_app, auth("metrics-user")
    body = {"prompt": PROMPT, "target_duration": 9, "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}
    accepted = httpx.post(f"{base}/api/generate", json=body, headers=headers, timeout=30)
    assert accepted.status_code == 202, accepted.text
    status = wait_done(base, accepted.json()["generation_id"], headers)
    assert status["status"] == "completed", status

    scenes = status["storyboard_plan"]["scenes"]
    total = status["cost"]
    # Offline providers: plausible tokens, cost exactly 0 (known, not unknown).
    assert total["usd"] == 0.0 and total["unknown"] is False
    assert total["llm_calls"] == 1 + 2 * len(scenes)  # the storyboard, then one round of both agents a scene
    assert total["images"] == 2 * len(scenes) and total["input_tokens"] > 0
    for scene in scenes:
        assert scene["cost"]["images"] == 2 and scene["cost"]["llm_calls"] == 2
        assert scene["timing"]["generation_s"] > 0 and scene["timing"]["scoring_s"] > 0
    assert status["timing"]["scenes_timed"] == len(scenes) and status["timing"]["planning_s"] is not None

    text = scrape_until(metrics_url(), EXPECTED)
    sceneref_lines = [line for line in text.splitlines() if line.startswith("ray_sceneref_")]
    assert sceneref_lines
    for line in sceneref_lines:  # labels never carry the user or the prompt
        assert "metrics-user" not in line and "kettle" not in line, line
