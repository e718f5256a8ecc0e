"""A simulated multi-node GPU cluster: the production config's scorers (the four quality
scorers and Consistency) pack onto one GPU node, beside an ingress replica that runs a job.
When that node dies mid-generation, the scorers come back on the other node, the job of the
dead ingress is taken over through its lease by an ingress replica on another node (never
before the lease expired), the job whose runner lived keeps its lease, both complete with the
scenes they had finished unchanged byte for byte, and no HTTP request hangs: every answer is 200
but Serve's own 500 for a request in flight on the dead ingress replica before Serve marked it dead.

The cluster runs in a process of its own (tests/multinode_scenario.py: one Ray cluster per
driver process, and this session may already hold one); this test starts it, reads the JSON it
writes and asserts on it, and always ends the process group and every process that still runs
from the scenario's own Ray temp dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multinode  # `make test` runs it in its own process beside the rest

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_S = 900  # a few minutes on 2 cores; generous so a busy machine does not fail it
THE_FOUR = {"PickScore", "CLIPScore", "VQAScore", "Aesthetic"}  # the guide's quality scorers, at least


def _processes_using(marker: str) -> list[int]:
    """Pids of processes whose command line or environment names `marker` (the scenario's own
    RAY_TMPDIR): the Ray processes it started, even ones that left its process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in text:
            pids.append(int(entry.name))
    return pids


def _end(process: subprocess.Popen, ray_tmpdir: str | None) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    if ray_tmpdir:
        for pid in _processes_using(ray_tmpdir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("multinode")
    out = work / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env["RAY_AUTH_MODE"] = "disabled"
    log = (work / "scenario.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "multinode_scenario.py"), "--out", str(out), "--workdir", str(work / "run")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    result = None
    try:
        try:
            process.wait(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        if out.exists():
            result = json.loads(out.read_text())
    finally:
        _end(process, result.get("ray_tmpdir") if result else None)
        log.close()
    tail = (work / "scenario.log").read_text()[-4000:]
    assert result is not None, f"the scenario wrote no result within {SCENARIO_TIMEOUT_S} s; its log ends:\n{tail}"
    assert result["ok"], f"the scenario failed:\n{result.get('error')}\nlog:\n{tail}"
    events, http = result["events"], result["http"]
    print(f"multinode: {events}; scorers back {events['scorers_back'] - events['node_removed']:.1f} s and "
          f"generations done {events['generations_done'] - events['node_removed']:.1f} s after the kill; "
          f"{len(http)} HTTP requests, answers {sorted({r.get('code', r.get('error')) for r in http}, key=str)}, "
          f"slowest {max(r['latency_s'] for r in http):.2f} s; leases seen {result['leases_seen']}; "
          f"at the kill {result['removal']['leases']}")
    removal = result["removal"]
    seen_dead = removal.get("serve_saw_dead_at")
    print(f"multinode: Ray saw the Ingress replica dead "
          f"{[round(t - removal['removed_at'], 2) for t in removal.get('ray_saw_dead_at', {}).values()]} s and Serve "
          f"{round(seen_dead - removal['removed_at'], 2) if seen_dead else None} s after the removal")
    for r in http:
        if r.get("code") != 200:
            print(f"multinode: non-200 {r.get('code', r.get('error'))} {r['path']} sent "
                  f"{r['t'] - removal['removed_at']:+.2f} s from the removal, "
                  f"{r['t'] - seen_dead if seen_dead else float('nan'):+.2f} s from Serve seeing the replica dead, "
                  f"latency {r['latency_s']} s, headers {r.get('headers')}, body {r.get('body')!r}, "
                  f"Serve's log: {r.get('serve_log_lines')}")
    return result


def test_scorers_pack_onto_one_gpu_node(scenario):
    scorers = scenario["scorers"]
    assert THE_FOUR <= set(scorers)
    placement = scenario["placement_before"]
    gpu_nodes = set(scenario["nodes"]["gpu"])
    nodes = {r["node"] for name in scorers for r in placement[name]}
    assert all(len(placement[name]) == 1 for name in scorers), placement
    assert len(nodes) == 1 and nodes <= gpu_nodes, placement
    # One ingress replica on each GPU node (the scenario's INGRESS_SLOT): the node that dies
    # hosts the scorers and an ingress replica; the other node hosts the other one.
    assert sorted(r["node"] for r in placement["Ingress"]) == sorted(gpu_nodes), placement["Ingress"]
    assert scenario["removal"]["ingress_on_removed_node"], scenario["removal"]["placement_at_removal"]


def test_scorers_come_back_on_the_other_gpu_node(scenario):
    removal = scenario["removal"]
    assert removal["removed_node"] in scenario["nodes"]["gpu"]
    assert removal["removed_node"] != scenario["nodes"]["driver"]
    after = scenario["placement_after"]
    for name in scenario["scorers"]:
        assert after[name] and {r["node"] for r in after[name]} == {removal["survivor_node"]}, after
        assert {r["actor"] for r in after[name]}.isdisjoint(r["actor"] for r in scenario["placement_before"][name])


def test_generations_complete_with_their_finished_scenes_unchanged(scenario):
    removal = scenario["removal"]
    # The node died while the target had finished scenes and scenes still to go.
    assert removal["target_status"] == "running"
    assert 1 <= removal["target_scenes_before"] < 3
    for gid, generation in scenario["generations"].items():
        assert generation["status"] == "completed", generation
        assert generation["scenes_planned"] == 3
        assert sorted(scenario["after"][gid]) == ["1", "2", "3"]
        for number, before in scenario["before"][gid].items():
            after = scenario["after"][gid][number]
            assert after["row"] == before["row"], f"{gid} scene {number} changed"
            assert after["image_sha256"] == before["image_sha256"]
    assert len(scenario["before"][removal["target"]]) == removal["target_scenes_before"]


def _holder_pid(holder: str) -> int:
    """Ingress lease holders are `ingress-{host}-{pid}-{nonce}`."""
    return int(holder.rsplit("-", 2)[1])


def _split_by_runner(scenario) -> tuple[str, str]:
    """(the job whose runner died with the node, the job whose runner lived): exactly one each."""
    removal = scenario["removal"]
    ingress = removal["placement_at_removal"]["Ingress"]
    lost_pids = {r["pid"] for r in ingress if r["node"] == removal["removed_node"]}
    assert removal["leases"].keys() == scenario["generations"].keys()
    for lease in removal["leases"].values():  # a job that already finished holds no lease
        assert lease["holder"] is None or _holder_pid(lease["holder"]) in {r["pid"] for r in ingress}, lease
    lost = [gid for gid, lease in removal["leases"].items()
            if lease["holder"] is not None and _holder_pid(lease["holder"]) in lost_pids]
    kept = [gid for gid in removal["leases"] if gid not in lost]
    assert len(lost) == 1 and len(kept) == 1, removal["leases"]
    assert lost == [removal["target"]]
    return lost[0], kept[0]


def test_the_dead_ingress_job_is_taken_over_on_another_node(scenario):
    """Claimed again (a newer token) by an ingress replica that is not on the removed node, and
    not before the dead runner's lease had expired (the claim sets expiry = claim + lease_s)."""
    removal = scenario["removal"]
    lost, _ = _split_by_runner(scenario)
    old = removal["leases"][lost]
    later = [lease for lease in scenario["leases_seen"][lost] if lease["token"] > old["token"]]
    assert later, f"{lost}: its runner died with the node and nobody took it over: {scenario['leases_seen'][lost]}"
    takeover = later[0]
    on_removed = {r["pid"] for r in removal["placement_at_removal"]["Ingress"] if r["node"] == removal["removed_node"]}
    elsewhere = {r["pid"] for r in scenario["ingress_after"]}
    assert _holder_pid(takeover["holder"]) not in on_removed
    assert _holder_pid(takeover["holder"]) in elsewhere, (takeover, scenario["ingress_after"])
    assert all(r["node"] != removal["removed_node"] for r in scenario["ingress_after"])
    claimed_at = takeover["expires_at"] - scenario["lease_s"]
    assert claimed_at >= old["expires_at"], f"taken over {old['expires_at'] - claimed_at:.2f} s before the lease expired"
    assert scenario["generations"][lost]["lease_token_final"] == later[-1]["token"]


def test_the_job_whose_runner_lived_keeps_its_lease(scenario):
    _, kept = _split_by_runner(scenario)
    lease = scenario["removal"]["leases"][kept]
    # One lease from start to end (it may have finished before the removal: no holder then).
    seen = scenario["leases_seen"][kept]
    assert {s["token"] for s in seen} == {lease["token"]}, seen
    assert len({s["holder"] for s in seen if s["holder"]}) == 1, seen
    assert scenario["generations"][kept]["lease_token_final"] == lease["token"]


SERVE_500_BODY = "Internal Server Error"  # uvicorn's answer when Serve's proxy got no response from the replica


def _is_serve_500_for_the_dead_ingress(record: dict, removal: dict) -> bool:
    """A request in flight on (or routed to) the Ingress replica whose node died, before Serve
    had marked that replica dead: no app code can answer it, and Serve's proxy answers a bare
    500. It must be exactly that: Serve's body (not the app's Problem body), and Serve's log for
    its request id names the dead replica's actor."""
    headers = {k.lower(): v for k, v in record.get("headers", {}).items()}
    logged = "\n".join(record.get("serve_log_lines", []))
    return (
        record.get("code") == 500
        and not headers.get("content-type", "").startswith("application/problem+json")
        and record.get("body") == SERVE_500_BODY
        and record["t"] < removal["serve_saw_dead_at"]
        and any(actor_id in logged for actor_id in removal["ingress_actor_ids_on_removed_node"])
    )


def test_no_http_request_hangs(scenario):
    """Every request answers within its client timeout, and every answer is 200 except Serve's
    own 500 for a request that was in flight on the Ingress replica of the removed node (sent
    before Serve marked that replica dead, routed to it): every request sent after that is 200."""
    records = scenario["http"]
    removal = scenario["removal"]
    after = [r for r in records if r["t"] >= removal["removed_at"]]
    assert records and after, "the status poller recorded nothing after the removal"
    assert not [r for r in records if r.get("error") == "timeout"], "a request hit its client timeout"
    assert removal["serve_saw_dead_at"], f"Serve never reported the removed node's Ingress replica dead: {removal}"
    seen_dead = [r for r in records if r["t"] >= removal["serve_saw_dead_at"]]
    assert [r for r in seen_dead if r["path"].startswith("/api/status/")], "no status request after Serve saw the replica dead"
    assert all(r.get("code") == 200 for r in seen_dead), [r for r in seen_dead if r.get("code") != 200]
    unexplained = [r for r in records if r.get("code") != 200 and not _is_serve_500_for_the_dead_ingress(r, removal)]
    assert not unexplained, (unexplained, {k: removal.get(k) for k in ("removed_at", "serve_saw_dead_at", "ray_saw_dead_at")})
