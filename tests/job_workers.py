"""Process entry points for the job store's multi-process tests (spawned processes import
them by name, so they live in a module of their own)."""

from __future__ import annotations

import os
import time

from pipeline.jobs.store import JobStore
from pipeline.schemas import SceneResult


def open_store(url: str) -> str:
    """Open (and so migrate) the store; answer the schema revision it found."""
    from pipeline.jobs import migrations

    store = JobStore(url)
    try:
        with store.engine.connect() as conn:
            return migrations.current(conn)
    finally:
        store.close()


def race(url: str, holder: str, scenes: int, barrier, results) -> None:
    """Claim jobs until none is left; "run" each by checkpointing its scenes fenced by the
    lease, each image key naming this holder, then finish it. Puts (holder, [(job, token)])."""
    store = JobStore(url)
    claimed: list[tuple[str, int]] = []
    barrier.wait()  # everyone starts together, store open and warm
    try:
        while (lease := store.claim(holder, 30.0)) is not None:
            claimed.append((lease.generation_id, lease.token))
            for number in range(1, scenes + 1):
                store.checkpoint_scene(lease.generation_id, scene(lease.generation_id, number, holder), lease)
                store.update(lease.generation_id, progress=number * 100 // (scenes + 1), lease=lease)
            store.finish(lease, "completed")
    finally:
        store.close()
        results.put((holder, claimed))


def scene(generation_id: str, number: int, holder: str) -> SceneResult:
    return SceneResult(
        scene_number=number,
        duration=5,
        original_prompt=f"scene {number}",
        enhanced_prompt=f"shot {number}",
        prompt_score=80.0,
        reference_image_key=f"{generation_id}/scene_{number}/{holder}-{os.getpid()}.png",
        quality_score=60.0,
    )


def doomed_runner(url: str, artifacts_root: str, generation_id: str, lease_s: float, scenes: int) -> None:
    """A runner that renews its lease, checkpoints scenes 1..scenes-2 with random image bytes
    (a rerun would never reproduce them), then hangs mid-scene until it is killed."""
    import threading

    from pipeline.storage.objectstore import LocalObjectStore

    store, artifacts = JobStore(url), LocalObjectStore(artifacts_root)
    lease = store.claim("doomed", lease_s, generation_id=generation_id)
    assert lease is not None

    def renew() -> None:
        while True:
            time.sleep(lease_s / 3)
            store.renew(lease, lease_s)

    threading.Thread(target=renew, daemon=True).start()
    for number in range(1, scenes - 1):
        run_scene(store, artifacts, lease, number)
    artifacts.put(f"{generation_id}/scene_{scenes - 1}/half.png", os.urandom(64))  # mid-scene
    print("MID-SCENE", flush=True)
    time.sleep(3600)


def run_scene(store: JobStore, artifacts, lease, number: int) -> None:
    item = scene(lease.generation_id, number, lease.holder)
    artifacts.put(item.reference_image_key, os.urandom(4096))
    store.checkpoint_scene(lease.generation_id, item, lease)
