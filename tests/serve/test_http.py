"""HTTP end to end on a real local Ray: the guide's bodies, multipart, auth, bad uploads."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import jwt
import pytest
from PIL import Image

from tests.serve.conftest import AUDIENCE, SECRET, auth, token, wait_done

pytestmark = pytest.mark.serve

QUICK_START = [
    {"prompt": "Artisan coffee that starts your morning right", "target_duration": 15},
    {
        "prompt": "Eco-friendly running shoes made from recycled ocean plastic",
        "target_duration": 12,
        "use_advanced_image_generation": True,
        "advanced_image_num_variations": 2,
        "advanced_image_max_enhancement_iterations": 2,
        "advanced_image_quality_threshold": 30.0,
    },
    {
        "prompt": "A cozy winter cabin getaway with hot chocolate by the fire",
        "target_duration": 9,
        "advanced_image_num_variations": 3,
        "advanced_image_max_enhancement_iterations": 1,
        "advanced_image_quality_threshold": 0,
    },
]


def png(size=(64, 36), color=(200, 120, 40), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def check_status_shape(status: dict, body: dict) -> None:
    assert set(status) >= {"generation_id", "status", "progress", "advanced_image_generation_used", "storyboard_plan"}
    assert status["status"] == "completed", status.get("error")
    assert status["progress"] == 100
    assert status["advanced_image_generation_used"] is True
    settings = status["storyboard_plan"]["advanced_image_settings"]
    assert settings == {
        "quality_threshold": body.get("advanced_image_quality_threshold", 30.0),
        "num_variations": body.get("advanced_image_num_variations", 4),
        "max_enhancement_iterations": body.get("advanced_image_max_enhancement_iterations", 4),
    }
    scenes = status["storyboard_plan"]["scenes"]
    assert [s["scene_number"] for s in scenes] == list(range(1, len(scenes) + 1))
    for scene in scenes:
        assert scene["reference_image_url"].startswith("http")
        assert scene["quality_score"] is None or 0 <= scene["quality_score"] <= 100


def _quiet_scorer(app_args, pick, timeout_s: float = 240.0) -> int:
    """Wait until no generation of the session app is unfinished (earlier tests, the fuzzer among
    them, leave theirs running or cancelled) and the scorer's batch log has stopped growing, so
    the batches counted next are this test's own; answers the log's length then."""
    from pipeline.jobs.store import JobStore

    deadline = time.monotonic() + timeout_s
    store = JobStore(app_args.database_url)
    try:
        while (unfinished := store.count_unfinished()) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        store.close()
    assert unfinished == 0, f"{unfinished} generations of earlier tests still unfinished after {timeout_s:.0f} s"
    last = -1
    while time.monotonic() < deadline:
        length = len(pick.recent_batch_sizes.remote().result(timeout_s=30))
        if length == last:
            return length
        last = length
        time.sleep(2)
    raise AssertionError("the scorer's batch log kept growing with no generation unfinished")


def test_quick_start_bodies_run_to_completion(offline_app, app_args):
    from ray import serve

    pick = serve.get_deployment_handle("PickScore", app_name="sceneref")
    seen = _quiet_scorer(app_args, pick)
    headers = auth("alice")
    ids = []
    for body in QUICK_START:  # submitted together: they run concurrently in the ingress
        reply = httpx.post(f"{offline_app}/api/generate", json=body, headers=headers, timeout=30)
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["generation_id"])
    expected_scenes = [4, 3, 3]
    for generation_id, body, count in zip(ids, QUICK_START, expected_scenes):
        status = wait_done(offline_app, generation_id, headers)
        check_status_shape(status, body)
        assert len(status["storyboard_plan"]["scenes"]) == count
        assert status["offline"] is True
        # The consistency model is served like the scorers: every scene after the first is
        # compared with the previous scene and scene 1 (consistency); weight 0: reported only.
        later = status["storyboard_plan"]["scenes"][1:]
        assert later and all(0 <= scene["consistency_score"] <= 100 for scene in later), later
        assert status["storyboard_plan"]["consistency_sheet"]
        # The signed image URL works without a bearer token and serves a PNG.
        image = httpx.get(status["storyboard_plan"]["scenes"][-1]["reference_image_url"], timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # The runner sends one request per variation; the scorer merged them into batches.
    sizes = pick.recent_batch_sizes.remote().result(timeout_s=30)[seen:]
    assert sum(sizes) == sum(count * body.get("advanced_image_num_variations", 4)
                             for count, body in zip(expected_scenes, QUICK_START))
    assert max(sizes) > 1, sizes


def test_generate_with_image_uses_the_upload_as_scene_one(offline_app):
    headers = auth("bob")
    upload = png((80, 45), (10, 200, 30))
    reply = httpx.post(
        f"{offline_app}/api/generate-with-image",
        data={"prompt": "Fresh juice for a sunny afternoon picnic", "target_duration": "9",
              "advanced_image_num_variations": "2", "advanced_image_max_enhancement_iterations": "1"},
        files={"image": ("mine.png", upload, "image/png")},
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 202, reply.text
    status = wait_done(offline_app, reply.json()["generation_id"], headers)
    check_status_shape(status, {"advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1})
    first = status["storyboard_plan"]["scenes"][0]
    assert first["user_provided"] is True and first["quality_score"] is None
    served = Image.open(io.BytesIO(httpx.get(first["reference_image_url"], timeout=10).content))
    assert served.size == (80, 45) and served.convert("RGB").getpixel((5, 5)) == (10, 200, 30)

    # Traces are listed and fetched by their owner only.
    traces = httpx.get(f"{offline_app}/api/generations/{status['generation_id']}/traces", headers=headers, timeout=10)
    assert traces.status_code == 200
    files = traces.json()["files"]
    assert "scene_2/selected_best.txt" in files and "scene_2/quality_scores.json" in files
    text = httpx.get(
        f"{offline_app}/api/generations/{status['generation_id']}/traces/scene_2/selected_best.txt",
        headers=headers, timeout=10,
    )
    assert text.status_code == 200 and "selected: image_" in text.text
    other = httpx.get(f"{offline_app}/api/generations/{status['generation_id']}/traces", headers=auth("eve"), timeout=10)
    assert other.status_code == 404


def test_another_users_generation_is_404(offline_app):
    reply = httpx.post(f"{offline_app}/api/generate", json=QUICK_START[2], headers=auth("carol"), timeout=30)
    generation_id = reply.json()["generation_id"]
    assert httpx.get(f"{offline_app}/api/status/{generation_id}", headers=auth("mallory"), timeout=10).status_code == 404
    assert httpx.get(f"{offline_app}/api/status/{'0' * 32}", headers=auth("carol"), timeout=10).status_code == 404
    wait_done(offline_app, generation_id, auth("carol"))


def _forge(header: dict, claims: dict, key: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(key)}"


@pytest.mark.parametrize(
    "case",
    ["missing", "not-bearer", "expired", "bad-signature", "alg-none", "wrong-audience", "no-audience", "not-before"],
)
def test_auth_failures_are_401(offline_app, case):
    now = int(time.time())
    good = {"sub": "a", "exp": now + 60, "aud": AUDIENCE}
    headers = {
        "missing": {},
        "not-bearer": {"Authorization": f"Basic {token()}"},
        "expired": {"Authorization": "Bearer " + jwt.encode({**good, "exp": now - 3600}, SECRET, algorithm="HS256")},
        "bad-signature": {"Authorization": "Bearer " + jwt.encode(good, "y" * 48, algorithm="HS256")},
        "alg-none": {"Authorization": "Bearer " + _forge({"alg": "none", "typ": "JWT"}, good)},
        "wrong-audience": {"Authorization": "Bearer " + jwt.encode({**good, "aud": "other"}, SECRET, algorithm="HS256")},
        "no-audience": {"Authorization": "Bearer " + jwt.encode({"sub": "a", "exp": now + 60}, SECRET, algorithm="HS256")},
        "not-before": {"Authorization": "Bearer " + jwt.encode({**good, "exp": now + 600, "nbf": now + 300}, SECRET, algorithm="HS256")},
    }[case]
    for method, path in [("post", "/api/generate"), ("get", "/api/status/abc")]:
        reply = httpx.request(method, f"{offline_app}{path}", json=QUICK_START[0], headers=headers, timeout=10)
        assert reply.status_code == 401, (case, reply.text)
        assert reply.headers["www-authenticate"].startswith("Bearer")


def test_health_needs_no_token(offline_app):
    health = httpx.get(f"{offline_app}/api/health", timeout=10).json()
    assert health["status"] == "ok" and health["offline"] is True


def test_ready_asks_serve_for_every_deployment_a_generation_needs(offline_app):
    """Readiness comes from Serve's controller (the real replica states), not from this replica,
    and from probes of the stores every generation writes to."""
    ready = httpx.get(f"{offline_app}/api/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "deployments": ["ImageGenerator", "PromptAgents", "PickScore", "CLIPScore", "VQAScore", "Aesthetic", "Consistency"],
        "stores": ["job store", "object store", "trace store"],
    }


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "short", "target_duration": 15}, "prompt"),
        ({"prompt": "x" * 2001, "target_duration": 15}, "prompt"),
        ({"prompt": "Artisan coffee that starts your morning right", "target_duration": 61}, "target_duration"),
        ({"prompt": "Artisan coffee that starts your morning right", "advanced_image_num_variations": 0}, "advanced_image_num_variations"),
        ({"prompt": "Artisan coffee that starts your morning right", "advanced_image_num_variations": 1000}, "advanced_image_num_variations"),
        ({"prompt": "Artisan coffee that starts your morning right", "advanced_image_quality_threshold": -1}, "advanced_image_quality_threshold"),
        ({"target_duration": 15}, "prompt"),
    ],
)
def test_validation_errors_name_the_field(offline_app, body, field):
    reply = httpx.post(f"{offline_app}/api/generate", json=body, headers=auth(), timeout=10)
    assert reply.status_code == 422
    assert field in reply.json()["detail"] and field in {e["field"] for e in reply.json()["errors"]}


def test_malformed_json_body_is_4xx(offline_app):
    headers = {**auth(), "Content-Type": "application/json"}
    reply = httpx.post(f"{offline_app}/api/generate", content=b"{not json", headers=headers, timeout=10)
    assert reply.status_code == 422


@pytest.mark.parametrize(
    "name,content,status",
    [
        ("big.png", b"\x89PNG\r\n\x1a\n" + b"0" * 2_100_000, 413),
        ("fake.png", b"GIF89a" + b"0" * 100, 415),
        ("text.png", b"hello, this is not an image at all", 415),
        ("empty.png", b"", 422),
        ("truncated.png", png()[:40], 422),
        ("huge.png", None, 422),  # 3000x3000 = 9 MP > the 4 MP test limit, tiny on disk
    ],
)
def test_bad_uploads_are_rejected_with_4xx(offline_app, name, content, status):
    if content is None:
        content = png((3000, 3000), 0, mode="1")
    reply = httpx.post(
        f"{offline_app}/api/generate-with-image",
        data={"prompt": "Artisan coffee that starts your morning right", "target_duration": "9"},
        files={"image": (name, content, "image/png")},
        headers=auth(),
        timeout=30,
    )
    assert reply.status_code == status, reply.text
    assert "image" in reply.json()["detail"]


def test_multipart_validation_names_the_field(offline_app):
    reply = httpx.post(
        f"{offline_app}/api/generate-with-image",
        data={"prompt": "Artisan coffee that starts your morning right", "target_duration": "100"},
        files={"image": ("a.png", png(), "image/png")},
        headers=auth(),
        timeout=30,
    )
    assert reply.status_code == 422 and "target_duration" in reply.json()["detail"]
    missing = httpx.post(f"{offline_app}/api/generate-with-image", data={"prompt": "Artisan coffee for you"}, headers=auth(), timeout=30)
    assert missing.status_code == 422 and "image" in missing.json()["detail"]


def test_tampered_or_expired_image_links_are_refused(offline_app):
    headers = auth("dave")
    reply = httpx.post(f"{offline_app}/api/generate", json=QUICK_START[2], headers=headers, timeout=30)
    status = wait_done(offline_app, reply.json()["generation_id"], headers)
    url = status["storyboard_plan"]["scenes"][0]["reference_image_url"]
    assert httpx.get(url.replace("scene_1", "scene_2"), timeout=10).status_code == 403
    assert httpx.get(url.split("?")[0], timeout=10).status_code == 403
    expired = url.split("expires=")[0] + "expires=1&" + url.split("&")[-1]
    assert httpx.get(expired, timeout=10).status_code == 403


# --- the API keeps its contract ---------------------------------------------------------


def test_crit_header_is_401(offline_app):
    forged = _forge({"alg": "HS256", "crit": ["x"]}, {"sub": "a", "exp": int(time.time()) + 60, "aud": AUDIENCE}, b"sig")
    reply = httpx.get(f"{offline_app}/api/status/abc", headers={"Authorization": f"Bearer {forged}"}, timeout=10)
    assert reply.status_code == 401, reply.text


def test_bad_trace_names_are_4xx(offline_app):
    headers = auth("trudy")
    reply = httpx.post(f"{offline_app}/api/generate", json=QUICK_START[2], headers=headers, timeout=30)
    generation_id = reply.json()["generation_id"]
    wait_done(offline_app, generation_id, headers)
    base = f"{offline_app}/api/generations/{generation_id}/traces"
    for name, expected in [("scene_1/a%00b.txt", 400), ("scene_1/" + "x" * 300, 400), ("x" * 5000, 400),
                           ("scene_1/" + "x" * 200, 400), ("scene_1/" + "x" * 100, 404)]:
        answer = httpx.get(f"{base}/{name}", headers=headers, timeout=10)
        assert answer.status_code == expected, (name[:20], answer.status_code, answer.text[:200])
        assert "detail" in answer.json()
    for bad_id in ["a%00b", "x" * 5000]:
        assert httpx.get(f"{offline_app}/api/status/{bad_id}", headers=headers, timeout=10).status_code == 404
        assert httpx.get(f"{offline_app}/api/generations/{bad_id}/traces", headers=headers, timeout=10).status_code == 404


def test_links_never_come_from_the_host_header(offline_app, app_args):
    headers = {**auth("hosty"), "Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    reply = httpx.post(f"{offline_app}/api/generate", json=QUICK_START[2], headers=headers, timeout=30)
    assert reply.status_code == 202, reply.text
    status_url = reply.json()["status_url"]
    assert "evil" not in status_url
    assert status_url == f"{app_args.public_base_url}/api/status/{reply.json()['generation_id']}"
    status = wait_done(offline_app, reply.json()["generation_id"], auth("hosty"))
    again = httpx.get(f"{offline_app}/api/status/{status['generation_id']}", headers=headers, timeout=10).json()
    for scene in again["storyboard_plan"]["scenes"]:
        assert scene["reference_image_url"].startswith(f"{app_args.public_base_url}/api/artifacts/")


def test_json_body_is_capped_and_unknown_fields_refused(offline_app):
    body = {**QUICK_START[0], "junk": "x" * 100_000}
    reply = httpx.post(f"{offline_app}/api/generate", json=body, headers=auth(), timeout=30)
    assert reply.status_code == 413, reply.text[:200]
    reply = httpx.post(f"{offline_app}/api/generate", json={**QUICK_START[0], "colour": "red"}, headers=auth(), timeout=30)
    assert reply.status_code == 422 and "colour" in reply.json()["detail"]
    assert reply.json()["errors"] == [{"field": "colour", "message": "Extra inputs are not permitted"}]


@pytest.mark.parametrize("prompt", ["\u200b" * 10, "\x00" * 10])
def test_prompt_without_visible_text_is_422(offline_app, prompt):
    reply = httpx.post(f"{offline_app}/api/generate", json={"prompt": prompt}, headers=auth(), timeout=30)
    assert reply.status_code == 422 and "prompt" in reply.json()["detail"]


def test_openapi_declares_what_the_server_sends(offline_app):
    document = httpx.get(f"{offline_app}/openapi.json", timeout=10).json()
    paths = document["paths"]
    declared = {code for path in paths.values() for operation in path.values() for code in operation["responses"]}
    assert declared >= {"400", "401", "403", "404", "409", "413", "415", "422", "429", "503"}
    assert set(paths["/api/generate"]["post"]["responses"]) >= {"202", "401", "413", "422", "429", "503"}
    assert set(paths["/api/generate-with-image"]["post"]["responses"]) >= {"202", "401", "413", "415", "422", "429", "503"}
    schema = paths["/api/generate"]["post"]["responses"]["422"]["content"]["application/problem+json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[1]
    body = document["components"]["schemas"][name]
    assert set(body["properties"]) == {"type", "title", "status", "detail", "instance", "errors"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
