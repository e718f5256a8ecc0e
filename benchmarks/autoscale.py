"""Autoscaling run: load raises the scorers' replicas and they come back down after.

A benchmark, not a test: it measures when Serve's autoscaler adds scorer replicas under load
and removes them once the load is gone, with the offline app on this machine. The app is
serve_config.offline.yaml deployed by `serve run` onto a one-node `ray.cluster_utils.Cluster`
(own short RAY_TMPDIR, random ports, no dashboard, so it keeps out of other Ray clusters'
way), with each scorer's typed `args.scorers.<name>.autoscaling_config` set from the command
line instead of a fixed replica count. Load is `--generations` concurrent generations over HTTP
(a JWT each); `serve.status()` is polled every `--poll-s` and every change of a scorer's
replica counts is recorded with its time since the load started.

    .venv/bin/python benchmarks/autoscale.py --out output/bench/autoscale.json

What to read in its summary: per scorer, when the first replica was added, the most replicas
RUNNING at once and when that count was reached, and when it was back at min_replicas after
the last generation finished (downscale_delay_s is part of that on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
SECRET = "bench-secret-" + "x" * 40
ENV = {"RAY_AUTH_MODE": "disabled", "SCENEREF_JWT_SECRET": SECRET, "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(ENV)  # before Ray is imported

from deployments.app import SCORER_DEPLOYMENTS  # noqa: E402  every scorer the app deploys

SCORERS = tuple(SCORER_DEPLOYMENTS.values())
PROMPT = "Artisan coffee that starts your morning right, in a sunlit corner cafe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(work: Path, port: int, models: Path, autoscaling: dict, users: int) -> Path:
    """serve_config.offline.yaml with free port, absolute local stores and autoscaled scorers."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.offline.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["public_base_url"] = f"http://127.0.0.1:{port}"
    args["database_url"] = f"sqlite:///{work / 'jobs.db'}"
    args["offline_models_dir"] = str(models)
    args["pipeline"]["traces"] = {"root": str(work / "traces"), "keep": False}
    args["pipeline"]["artifacts_dir"] = str(work / "artifacts")
    args["limits"] = {"max_active_per_user": 4, "max_unfinished": max(200, users * 4)}
    for serving in args["scorers"].values():
        if not isinstance(serving, dict):  # `layout`
            continue
        serving.pop("num_replicas", None)
        serving["autoscaling_config"] = dict(autoscaling)
    path = work / "serve_config.autoscale.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class ReplicaWatch(threading.Thread):
    """Polls serve.status() and keeps each scorer's replica-state counts whenever they change."""

    def __init__(self, t0: float, poll_s: float):
        super().__init__(daemon=True)
        self.t0, self.poll_s = t0, poll_s
        self.changes: list[dict] = []
        self.last: dict[str, dict] = {}
        self.stop = threading.Event()

    def counts(self) -> dict[str, dict]:
        from ray import serve

        app = serve.status().applications.get("sceneref")
        if app is None:
            return {}
        return {
            name: {str(getattr(k, "value", k)): v for k, v in app.deployments[name].replica_states.items()}
            for name in SCORERS if name in app.deployments
        }

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                now = self.counts()
            except Exception as exc:  # the controller is busy: try again next tick
                now, error = {}, exc
                print(f"serve.status() failed: {error}", flush=True)
            for name, states in now.items():
                if states != self.last.get(name):
                    self.changes.append({"t": round(time.monotonic() - self.t0, 2), "deployment": name, "states": states})
                    self.last[name] = states
            self.stop.wait(self.poll_s)

    def running(self, name: str) -> int:
        return self.last.get(name, {}).get("RUNNING", 0)


def drive(base: str, generations: int, body: dict, deadline_s: float) -> dict:
    """Submit `generations` at once (one user each, so no per-user limit applies), wait for all."""
    import httpx

    from deployments.auth import mint_token

    jobs = {}
    with httpx.Client(timeout=30) as client:
        for i in range(generations):
            headers = {"Authorization": f"Bearer {mint_token(SECRET, f'load-{i}')}"}
            reply = client.post(f"{base}/api/generate", json=body, headers=headers)
            reply.raise_for_status()
            jobs[reply.json()["generation_id"]] = headers
        deadline = time.monotonic() + deadline_s
        final: dict[str, str] = {}
        while len(final) < len(jobs) and time.monotonic() < deadline:
            for gid, headers in jobs.items():
                if gid not in final:
                    status = client.get(f"{base}/api/status/{gid}", headers=headers).json()["status"]
                    if status in ("completed", "failed", "cancelled"):
                        final[gid] = status
            time.sleep(1)
    return final


def summarise(changes: list[dict], load_end: float, minimum: int) -> dict[str, dict]:
    """Per scorer, in seconds since the load started: the first upscale decision (more replicas
    than min_replicas, starting or running), the first extra replica RUNNING, the peak RUNNING
    count and when it was reached, and when it was back at exactly min_replicas after the load."""
    summary = {}
    for name in SCORERS:
        seen = [(c["t"], c["states"].get("RUNNING", 0), sum(c["states"].values())) for c in changes if c["deployment"] == name]
        peak = max((running for _, running, _ in seen), default=0)
        decided = next((t for t, _, total in seen if total > minimum), None)
        added = next((t for t, running, _ in seen if running > minimum), None)
        at_peak = next((t for t, running, _ in seen if running == peak), None) if peak > minimum else None
        back = next((t for t, running, total in seen if t >= load_end and running == total == minimum), None)
        summary[name] = {"upscale_decided_s": decided, "first_extra_running_s": added, "peak_running": peak,
                         "peak_reached_s": at_peak, "back_to_min_s": back,
                         "back_after_load_end_s": None if back is None else round(back - load_end, 2)}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "bench" / "autoscale.json")
    parser.add_argument("--generations", type=int, default=16, help="concurrent generations (the load)")
    parser.add_argument("--duration", type=int, default=45, help="target_duration of each (45 s -> 8 scenes)")
    parser.add_argument("--variations", type=int, default=4)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target", type=float, default=2, help="target_ongoing_requests per scorer replica")
    parser.add_argument("--upscale-delay", type=float, default=2.0)
    parser.add_argument("--downscale-delay", type=float, default=10.0)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--cpus", type=float, default=16, help="logical CPUs of the one node (2 real cores here)")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sceneref-autoscale-"))
    ray_tmpdir = tempfile.mkdtemp(prefix="srau-", dir="/tmp")  # unix socket paths: 107 bytes at most
    os.environ["RAY_TMPDIR"] = ray_tmpdir
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from scorers.tiny import build_tiny_models

    autoscaling = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                   "target_ongoing_requests": options.target, "upscale_delay_s": options.upscale_delay,
                   "downscale_delay_s": options.downscale_delay}
    body = {"prompt": PROMPT, "target_duration": options.duration, "advanced_image_num_variations": options.variations,
            "advanced_image_max_enhancement_iterations": 1}
    build_tiny_models(work / "models")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": options.cpus, "num_gpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port()})
    watch = None
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        config = write_config(work, port, work / "models", autoscaling, options.generations)
        subprocess.run([str(BIN / "serve"), "run", "--non-blocking", "--address", cluster.address, str(config)],
                       cwd=work, check=True, timeout=300, stdout=(work / "serve_run.log").open("w"), stderr=subprocess.STDOUT)
        started = time.monotonic()
        while serve.status().applications.get("sceneref") is None or serve.status().applications["sceneref"].status != "RUNNING":
            if time.monotonic() - started > 600:
                raise TimeoutError("the app was not RUNNING within 600 s")
            time.sleep(1)
        print(f"app running after {time.monotonic() - started:.0f} s; load starts", flush=True)
        t0 = time.monotonic()
        watch = ReplicaWatch(t0, options.poll_s)
        watch.start()
        final = drive(f"http://127.0.0.1:{port}", options.generations, body, deadline_s=900)
        load_end = round(time.monotonic() - t0, 2)
        print(f"load done after {load_end} s: {sorted(final.values())}", flush=True)
        # Wait for every scorer to be back at min_replicas (or give up after downscale delay + 120 s).
        deadline = time.monotonic() + options.downscale_delay + 120
        while time.monotonic() < deadline and not all(
            watch.last.get(n, {}) == {"RUNNING": options.min_replicas} for n in SCORERS
        ):
            time.sleep(options.poll_s)
        watch.stop.set()
        watch.join()
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "ray": ray.__version__},
            "autoscaling_config": autoscaling,
            "load": {**body, "generations": options.generations, "statuses": sorted(final.values()), "load_end_s": load_end},
            "summary": summarise(watch.changes, load_end, options.min_replicas),
            "changes": watch.changes,
        }
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"], indent=1))
        print(f"written to {options.out}")
    finally:
        if watch is not None:
            watch.stop.set()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
