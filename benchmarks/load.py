"""Load benchmark: how fast health and status answer while many generations run.

Starts the offline app as users start it (`serve run` on a copy of the tree's
`serve_config.offline.yaml` with a free port and its own output directory), submits
`--generations` generations at once from `--users` different users, lets every user poll its
own status once a second (as a client would), and meanwhile probes `GET /api/health` and one
`GET /api/status/{id}` every `--probe-s` seconds from a separate client. It reports latency
percentiles of the probes and of the submissions, the answers' status codes (202, 429, 503)
and how many generations completed.

    .venv/bin/python benchmarks/load.py --generations 100
    .venv/bin/python benchmarks/load.py --tree /tmp/old-checkout     # the same load on another commit

`--tree` runs another checkout of the project (its code comes first on PYTHONPATH) with this
venv, so two commits are measured with the same load on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = "load-secret-" + "x" * 40
ENV = {"RAY_AUTH_MODE": "disabled", "SCENEREF_JWT_SECRET": SECRET, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BODIES = {
    # 3 scenes x 2 variations, one enhancement round: the app's own overhead stands out
    "small": {"target_duration": 9, "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 1},
    # the guide's defaults (15 s: 4 scenes, 4 variations, up to 4 rounds): more trace and artifact writes
    "default": {"target_duration": 15},
}
PROMPT = "Artisan coffee that starts your morning right, take {i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tree: Path, work: Path, port: int, overrides: dict, ingress_replicas: int | None = None) -> Path:
    import yaml

    config = yaml.safe_load((tree / "serve_config.offline.yaml").read_text())
    config["http_options"]["port"] = port
    [app] = config["applications"]
    args = app["args"]
    args["database_url"] = f"sqlite:///{work / 'sceneref.db'}"
    args["offline_models_dir"] = str(ROOT / "output/offline-models")
    pipeline = args["pipeline"]
    pipeline["traces"]["root"] = str(work / "traces")
    pipeline["artifacts_dir"] = str(work / "artifacts")
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    if ingress_replicas:
        for entry in app["deployments"]:
            if entry["name"] == "Ingress":
                entry["num_replicas"] = ingress_replicas
    path = work / "serve_config.load.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def probe_process(base: str, probe_s: float, ids_in, results_out, stop) -> None:
    """Probes from a process of their own, so the 100 polling clients' event loop never delays
    them: what is measured is the service's latency, not the benchmark's."""
    import queue

    import httpx

    known: list[tuple[str, dict]] = []
    health: list[tuple[float, float]] = []  # (when sent, latency), time.monotonic is system-wide
    status: list[tuple[float, float]] = []
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                while True:
                    known.append(ids_in.get_nowait())
            except queue.Empty:
                pass
            t0 = time.monotonic()
            client.get(f"{base}/api/health")
            health.append((t0, time.monotonic() - t0))
            if known:
                gid, headers = random.choice(known)
                t0 = time.monotonic()
                client.get(f"{base}/api/status/{gid}", headers=headers)
                status.append((t0, time.monotonic() - t0))
            stop.wait(probe_s)
    results_out.put((health, status))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(values),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * pick(0.95), 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


async def run_load(base: str, generations: int, users: int, probe_s: float, limit_s: float, body: dict) -> dict:
    import httpx

    sys.path.insert(0, str(ROOT))
    from deployments.auth import mint_token

    tokens = [mint_token(SECRET, f"user{u}", ttl_s=7200) for u in range(users)]
    headers = [{"Authorization": f"Bearer {t}"} for t in tokens]
    limits = httpx.Limits(max_connections=generations + 10, max_keepalive_connections=generations + 10)
    submit_times: list[float] = []
    codes: dict[int, int] = {}
    ids: list[tuple[str, dict]] = []
    finals: dict[str, str] = {}
    submitted_at: list[float] = []
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client, httpx.AsyncClient(timeout=120) as probe:

        async def submit(i: int) -> None:
            h = headers[i % users]
            t0 = time.monotonic()
            reply = await client.post(f"{base}/api/generate", json={**body, "prompt": PROMPT.format(i=i)}, headers=h)
            submit_times.append(time.monotonic() - t0)
            submitted_at.append(time.monotonic())
            codes[reply.status_code] = codes.get(reply.status_code, 0) + 1
            if reply.status_code != 202:
                return
            gid = reply.json()["generation_id"]
            ids.append((gid, h))
            while time.monotonic() - started < limit_s:
                await asyncio.sleep(1.0)
                s = (await client.get(f"{base}/api/status/{gid}", headers=h)).json()
                if s["status"] in ("completed", "failed", "cancelled"):
                    finals[gid] = s["status"]
                    return

        ids_out, results_in, stop = mp.Queue(), mp.Queue(), mp.Event()
        prober = mp.Process(target=probe_process, args=(base, probe_s, ids_out, results_in, stop), daemon=True)
        prober.start()
        submitted = 0

        async def forward_ids() -> None:  # accepted ids go to the prober as they come
            nonlocal submitted
            while True:
                while submitted < len(ids):
                    ids_out.put(ids[submitted])
                    submitted += 1
                await asyncio.sleep(0.2)

        forwarder = asyncio.create_task(forward_ids())
        await asyncio.gather(*(submit(i) for i in range(generations)))
        forwarder.cancel()
        stop.set()
        health, status = await asyncio.to_thread(results_in.get)
        prober.join(30)
    outcome: dict[str, int] = {}
    for value in finals.values():
        outcome[value] = outcome.get(value, 0) + 1
    burst_end = max(submitted_at, default=started)
    during = lambda samples: percentiles([lat for t, lat in samples if t <= burst_end])  # noqa: E731
    after = lambda samples: percentiles([lat for t, lat in samples if t > burst_end])  # noqa: E731
    return {
        "submitted": generations,
        "burst_s": round(burst_end - started, 1),
        "answers": codes,
        "outcome": outcome,
        "unfinished_after_limit": len(ids) - len(finals),
        "wall_s": round(time.monotonic() - started, 1),
        "health": percentiles([lat for _, lat in health]),
        "status": percentiles([lat for _, lat in status]),
        "health_during_submissions": during(health),
        "health_after_submissions": after(health),
        "status_during_submissions": during(status),
        "status_after_submissions": after(status),
        "submit": percentiles(submit_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose code and offline config to run")
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--users", type=int, default=100, help="distinct token subjects (per-user limits apply to each)")
    parser.add_argument("--probe-s", type=float, default=0.25)
    parser.add_argument("--body", choices=list(BODIES), default="small", help="what each generation asks for")
    parser.add_argument("--limit-s", type=float, default=900, help="stop polling after this long")
    parser.add_argument("--args", type=json.loads, default={}, help="JSON merged into the app's args (e.g. limits)")
    parser.add_argument("--ingress-replicas", type=int, help="override the config's Ingress num_replicas")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "output/bench-load")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    tree = args.tree.resolve()
    work = args.work_dir.resolve() / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    subprocess.run([str(BIN / "sceneref"), "offline-models", "--dir", str(ROOT / "output/offline-models")],
                   check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    config = write_config(tree, work, port, args.args, args.ingress_replicas)
    env = {**os.environ, **ENV, "RAY_ADDRESS": "local", "PYTHONPATH": str(tree)}
    log = (work / "serve.log").open("w")
    process = subprocess.Popen([str(BIN / "serve"), "run", str(config)], cwd=tree, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve run exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{base}/api/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"not healthy after 600 s; see {log.name}")
            time.sleep(1)
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        body = BODIES[args.body]
        result = asyncio.run(run_load(base, args.generations, args.users, args.probe_s, args.limit_s, body))
        result.update(commit=commit, cpus=os.cpu_count(), machine=platform.processor() or platform.machine(), body=body)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
