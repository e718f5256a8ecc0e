"""Several processes race for the same jobs, on SQLite and PostgreSQL: every job runs exactly
once and nothing is lost. A runner killed mid-scene is taken over after its lease expires,
its finished scenes unchanged byte for byte."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from pipeline.jobs.store import JobStore
from pipeline.storage.objectstore import LocalObjectStore
from tests.job_workers import race, run_scene

REQUEST = {"prompt": "A lighthouse keeper climbs the stairs at dawn", "target_duration": 15}
JOBS, PROCESSES, SCENES = 24, 4, 3


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_db")
    return f"sqlite:///{tmp_path}/jobs.db"


def test_processes_racing_for_jobs_run_each_exactly_once(url):
    store = JobStore(url)
    ids = [f"gen-{index:02d}" for index in range(JOBS)]
    for gid in ids:
        store.create(gid, "alice", REQUEST, offline=True)
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(PROCESSES + 1), context.Queue()
    workers = [
        context.Process(target=race, args=(url, f"runner-{n}", SCENES, barrier, queue)) for n in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    results = [queue.get(timeout=120)[1] for _ in workers]
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    claims = [claim for result in results for claim in result]
    runs = Counter(gid for gid, _ in claims)
    print(
        f"\nclaim race [{url.split(':')[0]}]: {JOBS} jobs, {PROCESSES} processes, {len(claims)} claims, "
        f"per process {[len(r) for r in results]}, duplicates {sum(n - 1 for n in runs.values())}, "
        f"{elapsed:.2f} s from the common start"
    )
    assert sorted(runs) == ids and set(runs.values()) == {1}  # each job claimed exactly once
    assert {token for _, token in claims} == {1}
    for gid in ids:
        record = store.get(gid)
        assert (record.status, record.progress, record.lease_holder) == ("completed", 100, None)
        scenes = store.scenes(gid)
        assert [s.scene_number for s in scenes] == list(range(1, SCENES + 1))
        writers = {s.reference_image_key.split("/")[-1] for s in scenes}
        assert len(writers) == 1  # all scenes of a job by the one runner that claimed it
    assert store.count_unfinished() == 0
    store.close()


def test_killed_runner_is_taken_over_after_its_lease(url, tmp_path):
    lease_s, scenes = 1.0, 4
    store, artifacts = JobStore(url), LocalObjectStore(tmp_path / "artifacts")
    store.create("gen-1", "alice", REQUEST, offline=True)
    code = (
        "import sys; from tests.job_workers import doomed_runner; "
        "doomed_runner(sys.argv[1], sys.argv[2], 'gen-1', float(sys.argv[3]), int(sys.argv[4]))"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", code, url, str(tmp_path / "artifacts"), str(lease_s), str(scenes)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert runner.stdout.readline().strip() == "MID-SCENE"
        # Nobody may take the job from a live runner: once it has been seen renewing (its lease
        # pushed past the one read here), the rescuer is refused, however slow the machine.
        seen = store.get("gen-1").lease_expires_at
        deadline = time.monotonic() + 60
        while store.get("gen-1").lease_expires_at <= seen:
            assert time.monotonic() < deadline, "the live runner never renewed its lease"
            time.sleep(0.05)
        assert store.claim("rescuer", lease_s) is None
        before = store.scenes("gen-1")
        image_bytes = {s.scene_number: hashlib.sha256(artifacts.get(s.reference_image_key)).hexdigest() for s in before}
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        killed = time.perf_counter()
    finally:
        if runner.poll() is None:
            runner.kill()
    lapsed = store.get("gen-1").lease_expires_at  # the dead runner's last renewal: final now
    deadline = time.monotonic() + lease_s + 60  # a bound, not a figure: the time is printed below
    while (lease := store.claim("rescuer", 30.0)) is None:
        assert time.monotonic() < deadline, "the job was never taken over after its runner died"
        time.sleep(0.05)
    takeover_s = time.perf_counter() - killed
    print(f"\ntakeover [{url.split(':')[0]}]: lease_s={lease_s}, claimed {takeover_s:.2f} s after SIGKILL")
    assert lease.token == 2 and datetime.now(timezone.utc) >= lapsed  # taken over only once the lease lapsed
    done = {s.scene_number for s in store.scenes("gen-1")}
    assert done == {1, 2}
    for number in range(1, scenes + 1):
        if number not in done:
            run_scene(store, artifacts, lease, number)
    store.finish(lease, "completed")

    after = store.scenes("gen-1")
    assert after[:2] == before  # scene rows unchanged
    assert {n: hashlib.sha256(artifacts.get(after[n - 1].reference_image_key)).hexdigest() for n in (1, 2)} == image_bytes
    assert [s.reference_image_key.split("/")[-1].split("-")[0] for s in after] == ["doomed"] * 2 + ["rescuer"] * 2
    assert store.get("gen-1").status == "completed"
    store.close()
