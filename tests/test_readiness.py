"""Readiness from Serve's own status objects: a deployment with no RUNNING replica is named, the
answer is cached, and a controller that cannot be asked does not block the service."""

from __future__ import annotations

import asyncio

from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

from deployments.readiness import ReadinessCheck, running_replicas


def overview(**replicas: dict) -> ServeStatus:
    deployments = {
        name: DeploymentStatusOverview(
            status=DeploymentStatus.HEALTHY if states.get(ReplicaState.RUNNING) else DeploymentStatus.UPDATING,
            status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
            replica_states=states,
            message="",
        )
        for name, states in replicas.items()
    }
    app = ApplicationStatusOverview(status=ApplicationStatus.RUNNING, message="", last_deployed_time_s=0.0, deployments=deployments)
    return ServeStatus(applications={"sceneref": app})


REQUIRED = ["ImageGenerator", "PromptAgents", "PickScore", "VQAScore"]


def test_running_replicas_are_counted_per_deployment():
    status = overview(
        PickScore={ReplicaState.RUNNING: 2, ReplicaState.STARTING: 1},
        VQAScore={ReplicaState.STARTING: 1},
    )
    assert running_replicas(status, "sceneref") == {"PickScore": 2, "VQAScore": 0}
    assert running_replicas(status, "other") == {}


async def test_a_needed_deployment_without_a_running_replica_is_named():
    status = overview(
        ImageGenerator={ReplicaState.RUNNING: 1}, PromptAgents={ReplicaState.RUNNING: 1},
        PickScore={ReplicaState.RUNNING: 1}, VQAScore={ReplicaState.PENDING_MIGRATION: 1, ReplicaState.STARTING: 1},
    )
    result = await ReadinessCheck(lambda: status, "sceneref", REQUIRED).check()
    assert not result.ready and result.missing == ("VQAScore",)
    assert result.reason().startswith("VQAScore has no live replica right now")


async def test_answers_are_cached_and_shared():
    calls = []

    def status():
        calls.append(1)
        return overview(**{name: {ReplicaState.RUNNING: 1} for name in REQUIRED})

    check = ReadinessCheck(status, "sceneref", REQUIRED, cache_s=60)
    results = await asyncio.gather(*(check.check() for _ in range(20)))
    assert all(r.ready for r in results) and len(calls) == 1


async def test_a_controller_that_cannot_be_asked_does_not_refuse_work():
    def status():
        raise ConnectionError("controller unreachable")

    result = await ReadinessCheck(status, "sceneref", REQUIRED).check()
    assert result.ready and not result.checked


async def test_a_store_probe_that_hangs_is_unreachable_and_never_run_twice_at_once():
    """A store that does not answer is as unreachable as one that refuses; while its probe
    hangs, later checks say so without starting another (no thread pile-up)."""
    import threading

    from deployments.readiness import StoreCheck

    release, calls = threading.Event(), []

    def hanging():
        calls.append(1)
        release.wait(10)

    check = StoreCheck({"job store": hanging, "object store": lambda: None}, cache_s=0, timeout_s=0.2)
    try:
        first = await check.check()
        assert first.unreachable == (("job store", "no answer within 0.2 s"),)
        second = await check.check()
        assert not second.ok and "last probe has had no answer" in second.unreachable[0][1]
        assert len(calls) == 1
    finally:
        release.set()
    for _ in range(500):  # the hung probe ends (10 s at most); the next check probes again
        if check._running["job store"].done():
            break
        await asyncio.sleep(0.02)
    assert (await check.check()).ok and len(calls) == 2


async def test_a_store_error_is_named_in_the_reason():
    from deployments.readiness import StoreCheck

    def refused():
        raise ConnectionRefusedError("connection refused\nsecond line")

    health = await StoreCheck({"object store": refused}, cache_s=0).check()
    assert health.reason().startswith("the object store cannot be reached (ConnectionRefusedError: connection refused)")
