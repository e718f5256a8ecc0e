"""The job lifecycle over HTTP: cancel (owner only), resume, per-user limits, uploads that are
persisted before the answer and refused while they stream in."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from pipeline.storage.factory import open_store
from pipeline.jobs.store import JobStore
from tests.serve.conftest import auth, wait_done

pytestmark = pytest.mark.serve

LONG = {"prompt": "A lighthouse keeper's long day, from dawn to the night storm", "target_duration": 30,
        "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}
LONGEST = {"prompt": "A lighthouse keeper's long day, from dawn to the night storm", "target_duration": 60,
           "advanced_image_num_variations": 4, "advanced_image_max_enhancement_iterations": 2}
SHORT = {"prompt": "A cozy winter cabin getaway with hot chocolate", "target_duration": 9,
         "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}


def wait_status(base: str, generation_id: str, headers: dict, wanted: set[str], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/api/status/{generation_id}", headers=headers, timeout=10).json()
        if status["status"] in wanted:
            return status
        time.sleep(0.3)
    raise TimeoutError(f"{generation_id} not in {wanted}: {status}")


def test_cancel_by_the_owner_then_resume(offline_app, app_args):
    headers = auth("ivan")
    store = JobStore(app_args.database_url)
    generation_id = httpx.post(f"{offline_app}/api/generate", json=LONGEST, headers=headers, timeout=30).json()["generation_id"]
    deadline = time.monotonic() + 120
    while not store.scenes(generation_id) and time.monotonic() < deadline:
        time.sleep(0.2)

    other = httpx.delete(f"{offline_app}/api/generations/{generation_id}", headers=auth("mallory"), timeout=10)
    assert other.status_code == 404
    reply = httpx.delete(f"{offline_app}/api/generations/{generation_id}", headers=headers, timeout=10)
    assert reply.status_code == 202, reply.text
    assert reply.json()["cancel_requested"] is True
    status = wait_status(offline_app, generation_id, headers, {"cancelled", "completed", "failed"})
    assert status["status"] == "cancelled", status
    kept = store.scenes(generation_id)
    assert kept and len(kept) < len(status["storyboard_plan"]["scenes"])
    # No runner writes after the final status: it released the lease, and every runner write is
    # fenced by the lease it holds (tests/test_job_lifecycle.py: a runner without it writes
    # nothing), so no wait, however long, could show more than this does.
    record = store.get(generation_id)
    assert (record.status, record.lease_holder) == ("cancelled", None)
    assert len(store.scenes(generation_id)) == len(kept)
    again = httpx.delete(f"{offline_app}/api/generations/{generation_id}", headers=headers, timeout=10)
    assert again.status_code == 409

    resumed = httpx.post(f"{offline_app}/api/generations/{generation_id}/resume", headers=headers, timeout=10)
    assert resumed.status_code == 202, resumed.text
    done = wait_done(offline_app, generation_id, headers, timeout_s=400)
    assert done["status"] == "completed", done["error"]
    after = store.scenes(generation_id)
    assert after[: len(kept)] == kept  # resumed at the next scene, earlier scenes kept
    assert httpx.post(f"{offline_app}/api/generations/{generation_id}/resume", headers=headers, timeout=10).status_code == 409
    store.close()


def test_per_user_active_limit_answers_429_with_retry_after(offline_app, app_args):
    headers = auth("greedy")
    limit = app_args.limits.max_active_per_user
    accepted = []
    for _ in range(limit):
        reply = httpx.post(f"{offline_app}/api/generate", json=LONG, headers=headers, timeout=30)
        assert reply.status_code == 202, reply.text
        accepted.append(reply.json()["generation_id"])
    refused = httpx.post(f"{offline_app}/api/generate", json=LONG, headers=headers, timeout=30)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert f"limit {limit}" in refused.json()["detail"]
    assert httpx.post(f"{offline_app}/api/generate", json=SHORT, headers=auth("modest"), timeout=30).status_code == 202
    for generation_id in accepted:  # free the machine for the other tests
        assert httpx.delete(f"{offline_app}/api/generations/{generation_id}", headers=headers, timeout=10).status_code in (202, 409)
    for generation_id in accepted:
        wait_status(offline_app, generation_id, headers, {"cancelled", "completed"})
    assert httpx.post(f"{offline_app}/api/generate", json=SHORT, headers=headers, timeout=30).status_code == 202


def test_upload_is_persisted_before_the_answer(offline_app, app_args):
    headers = auth("heidi")
    image = io.BytesIO()
    Image.new("RGB", (120, 68), (220, 30, 60)).save(image, format="PNG")
    reply = httpx.post(
        f"{offline_app}/api/generate-with-image",
        data={"prompt": "Fresh juice for a sunny afternoon picnic", "target_duration": "9",
              "advanced_image_num_variations": "2", "advanced_image_max_enhancement_iterations": "1"},
        files={"image": ("mine.png", image.getvalue(), "image/png")}, headers=headers, timeout=30,
    )
    assert reply.status_code == 202, reply.text
    generation_id = reply.json()["generation_id"]
    store = JobStore(app_args.database_url)
    record = store.get(generation_id)  # right after the answer: the row names the stored image
    assert record.reference_key == f"{generation_id}/scene_1/user_reference.png"
    stored = open_store(app_args.pipeline.artifacts_dir, app_args.pipeline.s3).get(record.reference_key)
    assert Image.open(io.BytesIO(stored)).convert("RGB").tobytes() == Image.open(image).convert("RGB").tobytes()
    wait_done(offline_app, generation_id, headers)
    store.close()


def test_oversized_upload_is_refused_while_streaming(offline_app, app_args):
    limit = app_args.uploads.max_bytes
    sent = 0

    def body():
        nonlocal sent
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n\r\n"
        chunk = b"\x89PNG\r\n\x1a\n" + b"\0" * (64 * 1024 - 8)
        for _ in range(limit // len(chunk) * 30):  # 30x the limit, never announced in Content-Length
            sent += len(chunk)
            yield chunk

    try:
        reply = httpx.post(
            f"{offline_app}/api/generate-with-image", content=body(), timeout=60,
            headers={**auth("ivan"), "Content-Type": "multipart/form-data; boundary=xyz"},
        )
        assert reply.status_code == 413, reply.text
    except httpx.HTTPError:
        pass  # the server may close the connection once it answered 413
    assert sent < limit * 30  # the server stopped reading long before the end
