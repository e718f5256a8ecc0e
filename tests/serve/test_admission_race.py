"""Admission under a burst over HTTP: twenty submissions of one user sent at once to the offline
app (two ingress replicas, several worker threads each) start at most the per-user limit; the
rest are answered 429 with Retry-After."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipeline.jobs.store import JobStore
from tests.serve.conftest import auth
from tests.serve.test_lifecycle_http import LONGEST

pytestmark = pytest.mark.serve

BURST, WITH_IMAGE = 20, 6  # of the twenty, six through the upload route


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 54), (30, 140, 200)).save(out, format="PNG")
    return out.getvalue()


async def burst(base: str, headers: dict) -> list[httpx.Response]:
    image = png()
    form = {"prompt": LONGEST["prompt"], "target_duration": str(LONGEST["target_duration"]),
            "advanced_image_num_variations": "4", "advanced_image_max_enhancement_iterations": "2"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        gate = asyncio.Event()

        async def one(n: int) -> httpx.Response:
            await gate.wait()
            if n < WITH_IMAGE:
                return await client.post("/api/generate-with-image", data=form, files={"image": ("mine.png", image, "image/png")})
            return await client.post("/api/generate", json=LONGEST)

        tasks = [asyncio.create_task(one(n)) for n in range(BURST)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks)


def test_a_burst_of_one_user_starts_at_most_the_limit(offline_app, app_args):
    headers = auth("burst")
    limit = app_args.limits.max_active_per_user
    artifacts = Path(app_args.pipeline.artifacts_dir)
    before = set(os.listdir(artifacts)) if artifacts.exists() else set()
    replies = asyncio.run(burst(offline_app, headers))
    accepted = [r.json()["generation_id"] for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code != 202]
    try:
        statuses = [httpx.get(f"{offline_app}/api/status/{g}", headers=headers, timeout=10).json()["status"] for g in accepted]
        finished = sum(status in ("completed", "failed", "cancelled") for status in statuses)
        print(f"\nadmission burst over HTTP: {len(accepted)} of {BURST} accepted (limit {limit}), "
              f"{finished} of them already finished")
        # A job that finished during the burst frees its slot (these long ones never do in practice).
        assert limit <= len(accepted) <= limit + finished
        for reply in refused:
            assert reply.status_code == 429, reply.text
            assert int(reply.headers["Retry-After"]) >= 1
            assert f"limit {limit}" in reply.text
        listed = httpx.get(f"{offline_app}/api/generations", headers=headers, timeout=10).json()["generations"]
        assert sorted(g["generation_id"] for g in listed) == sorted(accepted)  # nothing refused was stored
        store = JobStore(app_args.database_url)
        try:  # an upload refused after it was stored is removed: every new prefix belongs to a job
            orphans = [p for p in set(os.listdir(artifacts)) - before if store.get(p) is None]
        finally:
            store.close()
        assert orphans == []
    finally:
        for generation_id in accepted:  # free the machine for the other tests
            httpx.delete(f"{offline_app}/api/generations/{generation_id}", headers=headers, timeout=10)
