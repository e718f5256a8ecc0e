"""The simulated multi-node scenario, run as its own process by
tests/test_cluster_multinode.py (`python tests/multinode_scenario.py --out result.json`).

Why a process of its own: Ray allows one cluster per driver process, and the pytest session
already holds one (tests/serve/conftest.py). This script starts a `ray.cluster_utils.Cluster`
of three nodes on this machine (a head without GPUs, two GPU nodes, each GPU node hosting one
ingress replica), deploys the production config (serve_config.yaml) on it with only what one
machine forces changed, runs two generations over HTTP (one per ingress replica), kills the
node that hosts the scorers *and* an ingress replica running a job once that job has finished
a scene, and writes what it observed as JSON: placements, every lease seen on every job (the
takeover), scene bytes before and after. It asserts nothing: the test decides, so a failed
check shows the facts next to it.

What is changed from serve_config.yaml, and why:
- proxy HeadOnly on 127.0.0.1 and a free port: the simulated nodes share one host, so one
  proxy per node would fight over one port;
- offline providers and the tiny CPU scorer models (`offline_models_dir`), SQLite and local
  directories: no network, no GPU (the GPUs are logical resources, as Ray counts them);
- one torch thread per scorer, a short job lease and a longer scoring retry budget: 2 cores
  run the whole cluster, so replacement replicas start slowly;
- one ingress replica per GPU node (a custom resource, INGRESS_SLOT, that only the GPU nodes
  have) and one job per ingress replica (`jobs.max_running_per_replica: 1`): so the node that
  hosts the scorers always hosts an ingress replica, and that replica always runs one of the
  two jobs when the node dies. Left to the scheduler, the ingress replicas may all land
  elsewhere and the takeover would never be exercised.
The GPU fractions, CPU reservations, autoscaling and ingress replica counts stay as shipped.

Isolation from other Ray clusters on the machine: its own short RAY_TMPDIR (unix socket paths
are limited to 107 bytes), random GCS, dashboard-agent and worker ports, no dashboard, and no
`ray stop` (the Cluster removes its own nodes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

SECRET = "multinode-secret-" + "x" * 40
REQUEST = {"target_duration": 9, "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1}
PROMPTS = {
    "mn-alice": "A lighthouse keeper's long day, from dawn to the night storm",
    "mn-bob": "Artisan coffee that starts your morning right",
}
CLIENT_TIMEOUT_S = 10.0  # every HTTP request of the scenario has one: a hang shows as a timeout
INGRESS_SLOT = "sceneref_ingress_slot"  # a logical resource: one per GPU node, one per ingress replica


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(ray_tmpdir: str) -> dict:
    """Set before the Cluster starts: raylets inherit it, and so every replica, the Serve
    controller (which reads the pack-scheduling switch) and the `serve run` subprocess."""
    return {
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": ray_tmpdir,
        "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY": "1",
        "SCENEREF_JWT_SECRET": SECRET,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def production_config(port: int, work: Path, models: Path) -> dict:
    """serve_config.yaml, changed only where one CPU-only machine forces it (module docstring)."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=port)
    args = config["applications"][0]["args"]
    args["database_url"] = f"sqlite:///{work / 'jobs.db'}"
    args["offline_models_dir"] = str(models)
    args["allow_random_weights"] = True  # the tiny CPU models: refused without it
    args["public_base_url"] = f"http://127.0.0.1:{port}"
    args["auth"] = {"mode": "hs256", "secret_env": "SCENEREF_JWT_SECRET"}
    args["jobs"].update(lease_s=6, poll_s=0.5, max_running_per_replica=1)
    args["handle_retry"] = {"scoring_budget_s": 300}
    pipeline = args["pipeline"]
    pipeline["llm"] = {"provider": "offline", "model": "offline-agents"}
    pipeline["images"] = {"provider": "offline", "model": "offline-procedural", "size": "256x144"}
    pipeline["scoring"] = {"device": "cpu", "dtype": "float32", "weights": pipeline["scoring"]["weights"]}
    pipeline["traces"] = {"root": str(work / "traces"), "keep": True}
    pipeline["artifacts_dir"] = str(work / "artifacts")
    pipeline.pop("s3", None)
    for serving in args["scorers"].values():
        if isinstance(serving, dict):  # not `layout`
            serving["threads"] = 1
    ingress = deployment_entry(config, "Ingress")
    ingress["ray_actor_options"] = {**ingress["ray_actor_options"], "resources": {INGRESS_SLOT: 1}}
    return config


def deployment_entry(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def gpu_node_cpus(config: dict) -> float:
    """Logical CPUs of a GPU node: room for one set of scorers (their CPU reservations in the
    config, summed), its ingress replica, and the generator and agents replicas, which may land
    on any node. So whichever node survives can take the scorers back."""
    section = config["applications"][0]["args"]["scorers"]
    if section.get("layout", "separate") != "separate":
        raise ValueError("the scenario kills the node of the separate layout's scorer deployments")
    scorers = sum(float(s.get("num_cpus", 1)) for name, s in section.items() if isinstance(s, dict) and name != "colocated")
    others = sum(float(deployment_entry(config, name)["ray_actor_options"]["num_cpus"])
                 for name in ("Ingress", "ImageGenerator", "PromptAgents"))
    return scorers + others


def replicas_by_deployment() -> dict[str, list[dict]]:
    """Live Serve replica actors per deployment, with their node, from Ray's actor table in the
    GCS (the state API needs the dashboard, which this cluster does not run)."""
    import ray

    found: dict[str, list[dict]] = {}
    for actor in ray._private.state.actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") != "ALIVE" or not name.startswith("SERVE_REPLICA::"):
            continue
        deployment = name.split("::", 1)[1].split("#")[1]
        found.setdefault(deployment, []).append({"actor": name, "actor_id": actor["ActorID"],
                                                 "node": actor["Address"]["NodeID"], "pid": actor["Pid"]})
    return found


class Poller(threading.Thread):
    """Polls each generation's status (and the health route) until stopped, each request with
    a client timeout, and records every answer: the proof that no request hangs. Each request
    carries its own `x-request-id` (Serve takes it as its request id and logs it in the proxy's
    log), and a non-200 answer is recorded with its headers and body: whether it is the app's
    Problem body or Serve's own, and what Serve logged about it (`serve_log_lines`)."""

    def __init__(self, base: str, generations: dict[str, dict]):
        super().__init__(daemon=True)
        self.base, self.generations = base, generations
        self.records: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            while not self.stop.is_set():
                targets = [(f"/api/status/{gid}", g["headers"]) for gid, g in self.generations.items()]
                for path, headers in targets + [("/api/health", {})]:
                    request_id = f"mn-poll-{len(self.records)}-{os.urandom(4).hex()}"
                    started = time.monotonic()
                    record = {"t": time.time(), "path": path, "request_id": request_id}
                    try:
                        reply = client.get(self.base + path, headers={**headers, "x-request-id": request_id})
                        record["code"] = reply.status_code
                        if reply.status_code != 200:
                            record["headers"] = dict(reply.headers)
                            record["body"] = reply.text[:2000]
                    except httpx.TimeoutException:
                        record["error"] = "timeout"
                    except httpx.HTTPError as exc:
                        record["error"] = type(exc).__name__
                    record["latency_s"] = round(time.monotonic() - started, 3)
                    self.records.append(record)
                self.stop.wait(0.5)


class DeathWatcher(threading.Thread):
    """Started just before the node is removed: records when Ray's actor table first shows each
    replica actor of `actors` (Ingress replicas on that node) no longer ALIVE (`ray_saw_dead_at`)
    and when Serve's controller first reports fewer RUNNING replicas of the deployment than
    `running_before` (`serve_saw_dead_at`: from then on the proxy's router no longer picks the dead
    replica). Wall-clock times, like the poller's `t`; each is the first poll that saw it, so a
    little late, never early."""

    def __init__(self, actors: list[str], deployment: str, running_before: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.actors, self.deployment, self.running_before, self.every_s = actors, deployment, running_before, every_s
        self.ray_saw_dead_at: dict[str, float] = {}
        self.serve_saw_dead_at: float | None = None
        self.serve_states: list[dict] = []  # each distinct replica_states seen, with when
        self.stop = threading.Event()

    def run(self) -> None:
        import ray
        from ray import serve

        while not self.stop.is_set() and (self.serve_saw_dead_at is None or len(self.ray_saw_dead_at) < len(self.actors)):
            for actor_id in self.actors:
                if actor_id not in self.ray_saw_dead_at:
                    try:
                        state = ray._private.state.actors(actor_id=actor_id).get("State")
                    except Exception:
                        state = None
                    if state is not None and state != "ALIVE":
                        self.ray_saw_dead_at[actor_id] = time.time()
            if self.serve_saw_dead_at is None:
                try:
                    states = serve.status().applications["sceneref"].deployments[self.deployment].replica_states
                except Exception:
                    states = None
                if states is not None:
                    states = {str(k).rsplit(".", 1)[-1]: v for k, v in states.items()}
                    if not self.serve_states or self.serve_states[-1]["states"] != states:
                        self.serve_states.append({"t": time.time(), "states": states})
                    if states.get("RUNNING", 0) < self.running_before:
                        self.serve_saw_dead_at = time.time()
            self.stop.wait(self.every_s)


def serve_log_lines(ray_tmpdir: str, request_ids: list[str], after: int = 14) -> dict[str, list[str]]:
    """What Serve's own logs (the proxy's, the replicas', the controller's) say about each request
    id: every log record naming it, with its continuation lines (a logged exception spans several;
    at most `after`), up to the next record."""
    import re

    record_start = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-")
    found: dict[str, list[str]] = {rid: [] for rid in request_ids}
    if not request_ids:
        return found
    logs = {log.resolve() for log in Path(ray_tmpdir).glob("**/session_2*/logs/serve/*.log")}  # under RAY_TMPDIR/ray/
    for log in sorted(logs):
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            for rid in request_ids:
                if rid in line:
                    record = [line]
                    for more in lines[i + 1:i + 1 + after]:
                        if record_start.match(more):
                            break
                        record.append(more)
                    found[rid].append(f"{log.name}: " + "\n".join(record))
    return found


class LeaseWatcher(threading.Thread):
    """Reads each job's row from the job store every `every_s` until stopped and records each
    distinct lease it sees (holder, token, expiry, when first seen): the takeover as an event,
    not as a duration guessed with a sleep. A finished job's row has no holder: the last lease
    seen before that is its final runner."""

    def __init__(self, store, generation_ids, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.store, self.ids, self.every_s = store, list(generation_ids), every_s
        self.leases: dict[str, list[dict]] = {gid: [] for gid in self.ids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for gid in self.ids:
                record = self.store.get(gid)
                seen = self.leases[gid]
                if record.lease_holder and (not seen or seen[-1]["token"] != record.lease_token):
                    seen.append({"holder": record.lease_holder, "token": record.lease_token, "seen_at": time.time(),
                                 "expires_at": record.lease_expires_at.timestamp()})
            self.stop.wait(self.every_s)


def holder_pid(holder: str) -> int:
    """Ingress lease holders are `ingress-{host}-{pid}-{nonce}`."""
    return int(holder.rsplit("-", 2)[1])


def scene_facts(store, artifacts, generation_id: str) -> dict[str, dict]:
    """Each checkpointed scene's row (as stored) and the sha256 of its selected image's bytes."""
    facts = {}
    for scene in store.scenes(generation_id):
        data = artifacts.get(scene.reference_image_key)
        facts[str(scene.scene_number)] = {
            "row": scene.model_dump(mode="json"),
            "image_sha256": hashlib.sha256(data).hexdigest(),
            "image_bytes": len(data),
        }
    return facts


def wait_for(predicate, timeout_s: float, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def scenario(work: Path, result: dict, spare_cpus: float) -> None:  # noqa: C901 (one story, told in order)
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import SCORER_DEPLOYMENTS
    from deployments.auth import mint_token
    from pipeline.storage.factory import open_store
    from pipeline.jobs.store import JobStore
    from scorers.tiny import build_tiny_models

    t0 = time.monotonic()
    stamp = lambda: round(time.monotonic() - t0, 2)  # noqa: E731
    events = result["events"]
    scorer_names = result["scorers"] = list(SCORER_DEPLOYMENTS.values())
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    models = work / "models"
    build_tiny_models(models)  # once here, so the replicas only load them
    events["models_built"] = stamp()

    config = production_config(port, work, models)
    node_cpus = gpu_node_cpus(config) + spare_cpus
    result["gpu_node_cpus"] = node_cpus
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "num_gpus": 0, "include_dashboard": False,
                        "dashboard_agent_listen_port": free_port()},
    )
    result["cluster"] = cluster  # for teardown; removed before the JSON is written
    gpu_nodes = [cluster.add_node(num_cpus=node_cpus, num_gpus=1, resources={INGRESS_SLOT: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    head_id = cluster.head_node.node_id
    result["nodes"] = {"head": head_id, "gpu": [n.node_id for n in gpu_nodes],
                       "driver": ray.get_runtime_context().get_node_id()}
    events["cluster_up"] = stamp()

    config_path = work / "serve_config.multinode.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config))
    # As an operator deploys it: `serve run` on the config, against this cluster's address.
    subprocess.run(
        [str(BIN / "serve"), "run", "--non-blocking", "--address", cluster.address, str(config_path)],
        cwd=work, env=os.environ.copy(), check=True, timeout=180,
        stdout=(work / "serve_run.log").open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/api/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the app's health route did not answer within 300 s")
        time.sleep(0.5)

    def all_scorers_running(on_nodes: set[str]):
        placed = replicas_by_deployment()
        ok = all(placed.get(d) and all(r["node"] in on_nodes for r in placed[d]) for d in scorer_names)
        return placed if ok else None

    gpu_ids = {n.node_id for n in gpu_nodes}
    wait_for(lambda: all_scorers_running(gpu_ids), 300, 0.5, "every scorer replica running")
    wait_for(lambda: {r["node"] for r in replicas_by_deployment().get("Ingress", [])} == gpu_ids, 300, 0.5,
             "an ingress replica on each GPU node")
    wait_for(lambda: serve.status().applications["sceneref"].status == "RUNNING", 300, 0.5, "app RUNNING")
    result["placement_before"] = replicas_by_deployment()
    events["app_running"] = stamp()

    # Generations over HTTP, with a JWT per user.
    store = JobStore(f"sqlite:///{work / 'jobs.db'}")
    artifacts = open_store(work / "artifacts")
    generations: dict[str, dict] = {}
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for user, prompt in PROMPTS.items():
            headers = {"Authorization": f"Bearer {mint_token(SECRET, user)}"}
            reply = client.post(f"{base}/api/generate", json={"prompt": prompt, **REQUEST}, headers=headers)
            if reply.status_code != 202:
                raise RuntimeError(f"submission answered {reply.status_code}: {reply.text}")
            generations[reply.json()["generation_id"]] = {"user": user, "headers": headers}
    events["submitted"] = stamp()
    poller = Poller(base, generations)
    poller.start()
    watcher = LeaseWatcher(JobStore(f"sqlite:///{work / 'jobs.db'}"), generations)
    watcher.start()

    # The victim: the node the scorers packed onto. Its ingress replica runs one of the jobs
    # (one job per replica, one replica per GPU node; module docstring).
    placement = replicas_by_deployment()
    scorer_nodes = {r["node"] for d in scorer_names for r in placement[d]}
    if len(scorer_nodes) != 1:
        raise RuntimeError(f"scorers are not on one node, refusing to choose: {placement}")
    victim_id = next(iter(scorer_nodes))
    victim = next(n for n in gpu_nodes if n.node_id == victim_id)
    survivor = next(n for n in gpu_nodes if n is not victim)
    victim_ingress = {r["pid"] for r in placement["Ingress"] if r["node"] == victim_id}

    def one_job_per_replica():
        holders = {gid: store.get(gid).lease_holder for gid in generations}
        pids = {holder_pid(h) for h in holders.values() if h}
        return holders if len(pids) == len(generations) == 2 else None

    wait_for(one_job_per_replica, 300, 0.1, "each ingress replica running one job")
    target = next(gid for gid in generations if holder_pid(store.get(gid).lease_holder) in victim_ingress)

    def mid_generation():
        """The victim's job has at least one finished scene and more to go."""
        return store.get(target).status == "running" and 1 <= len(store.scenes(target)) < 3

    wait_for(mid_generation, 300, 0.05, "the victim ingress's job with a finished scene")
    before = {gid: scene_facts(store, artifacts, gid) for gid in generations}
    record = store.get(target)
    placement = replicas_by_deployment()
    result["removal"] = {
        "target": target,
        "target_status": record.status,
        "target_scenes_before": len(before[target]),
        "leases": {gid: {"holder": r.lease_holder, "token": r.lease_token, "expires_at": r.lease_expires_at.timestamp() if r.lease_expires_at else None}
                   for gid, r in ((gid, store.get(gid)) for gid in generations)},
        "removed_node": victim_id,
        "survivor_node": survivor.node_id,
        "placement_at_removal": placement,
        "ingress_on_removed_node": [r["actor"] for r in placement.get("Ingress", []) if r["node"] == victim_id],
    }
    result["before"] = before
    victim_ingress_actors = [r["actor_id"] for r in placement.get("Ingress", []) if r["node"] == victim_id]
    result["removal"]["ingress_actor_ids_on_removed_node"] = victim_ingress_actors
    deaths = DeathWatcher(victim_ingress_actors, "Ingress", len(placement.get("Ingress", [])))
    deaths.start()
    removed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)  # a crash: SIGKILL, no goodbye
    result["removal"]["removed_at"] = removed_at
    events["node_removed"] = stamp()

    back = wait_for(lambda: all_scorers_running({survivor.node_id}), 400, 0.5, "scorers back on the survivor")
    result["placement_after"] = back
    events["scorers_back"] = stamp()

    def all_done():
        records = {gid: store.get(gid) for gid in generations}
        return records if all(r.status in ("completed", "failed", "cancelled") for r in records.values()) else None

    finished = wait_for(all_done, 400, 0.5, "all generations finished")
    events["generations_done"] = stamp()
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        final = {gid: client.get(f"{base}/api/status/{gid}", headers=g["headers"]).json() for gid, g in generations.items()}
    poller.stop.set()
    poller.join(timeout=CLIENT_TIMEOUT_S * 3)
    watcher.stop.set()
    watcher.join(timeout=CLIENT_TIMEOUT_S)
    result["leases_seen"] = watcher.leases
    result["lease_s"] = config["applications"][0]["args"]["jobs"]["lease_s"]
    result["ingress_after"] = replicas_by_deployment().get("Ingress", [])
    result["after"] = {gid: scene_facts(store, artifacts, gid) for gid in generations}
    result["generations"] = {
        gid: {
            "user": generations[gid]["user"],
            "status": final[gid]["status"],
            "error": final[gid].get("error"),
            "scenes_planned": len(final[gid]["storyboard_plan"]["scenes"]) if final[gid].get("storyboard_plan") else None,
            "lease_token_final": finished[gid].lease_token,
        }
        for gid in generations
    }
    deaths.stop.set()
    deaths.join(timeout=CLIENT_TIMEOUT_S)
    result["removal"].update(ray_saw_dead_at=deaths.ray_saw_dead_at, serve_saw_dead_at=deaths.serve_saw_dead_at,
                             serve_ingress_states=deaths.serve_states)
    odd = [r for r in poller.records if r.get("code") != 200]
    logged = serve_log_lines(os.environ["RAY_TMPDIR"], [r["request_id"] for r in odd])
    for r in odd:
        r["serve_log_lines"] = logged[r["request_id"]]
    result["http"] = poller.records
    result["serve_status_after"] = {
        name: {"status": str(d.status), "replicas": {str(k): v for k, v in d.replica_states.items()}}
        for name, d in serve.status().applications["sceneref"].deployments.items()
    }
    store.close()
    watcher.store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="where the JSON result goes")
    parser.add_argument("--workdir", type=Path, help="job store, artifacts, traces, models (default: a temp dir)")
    parser.add_argument("--spare-cpus", type=float, default=0,
                        help="logical CPUs per GPU node beyond what its replicas reserve")
    options = parser.parse_args()
    work = (options.workdir or Path(tempfile.mkdtemp(prefix="sceneref-multinode-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ray_tmpdir = tempfile.mkdtemp(prefix="srmn-", dir="/tmp")
    os.environ.update(environment(ray_tmpdir))
    result: dict = {"ok": False, "events": {}, "workdir": str(work), "ray_tmpdir": ray_tmpdir, "pid": os.getpid()}
    try:
        scenario(work, result, options.spare_cpus)
        result["ok"] = True
    except BaseException as exc:  # the JSON says what went wrong; the test shows it
        result["error"] = "".join(traceback.format_exception(exc))
    cluster = result.pop("cluster", None)
    options.out.write_text(json.dumps(result, indent=1, default=str))
    # Teardown: the driver leaves first (the Cluster refuses to remove the node a driver is
    # attached to), then the Cluster kills its own nodes' processes.
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    except Exception:
        traceback.print_exc()
    shutil.rmtree(ray_tmpdir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
