"""Serving benchmark: scoring throughput through the ingress with batching on and off,
and one 4-scene generation against its critical path.

The app runs as users run it: `serve run` on a generated copy of `serve_config.offline.yaml`
(offline providers, a free HTTP port, its own local Ray cluster), with bench-size scorer models
given explicitly in `args.pipeline.scoring.*` instead of `offline_models_dir`, and each scorer's
batching in its typed `args.scorers.<name>.batch` (from which the deployment options derive):

    on:  max_batch_size 16, batch_wait_timeout_s 0.02
    off: max_batch_size 1,  batch_wait_timeout_s 0.0

The benchmark also joins that cluster as a driver (its GCS port is read from the gcs_server
process that `serve run` started) to read each scorer's `recent_batch_sizes()` and to time
image generation and scoring directly through the deployment handles.

Scorer models (random weights, built once into --models-dir by scorers.tiny with the `bench`
shapes of scorers/shapes/bench.json): ViT-B-32-sized CLIP towers (vision width 768, text width 512, 12 layers each, patch 32, image 224)
for PickScore (transformers CLIPModel), CLIP-Score and Aesthetic (open_clip ViT-B-32-quickgelu
shape; aesthetic head 512 -> 1024 -> 128 -> 64 -> 16 -> 1), and a small Qwen2-VL for VQAScore
(4 text layers of width 512, vision depth 4).

Bytes per scene to the scorers (images by object reference): one scene's images (`--variations` of them, made by
the ImageGenerator deployment) scored through `HandleScoring` twice, with the bytes inline in
every scorer call (as before) and by object reference (put once per image); the serialized
size of every argument of every scorer call, and of every `ray.put`, is counted with Ray's own
serializer.

    .venv/bin/python benchmarks/serving.py --concurrency 1 4 16 --variations 2

Scoring throughput against the models' own limit: `--runs` compares the scorers'
serving as shipped in serve_config.offline.yaml with the serving before that work ("before"), in either layout,
and after each run measures the limit: the same four models on the run's own images and texts
in one process at batch 16 with all cores (the app stopped first, so the machine is quiet).

    .venv/bin/python benchmarks/serving.py --concurrency 16 --modes on --variations 2 --no-e2e \
        --runs before shipped:separate shipped:colocated
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
SECRET = "bench-secret-" + "x" * 40
ENV = {"RAY_AUTH_MODE": "disabled", "SCENEREF_JWT_SECRET": SECRET, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(ENV)

from deployments.app import SCORER_DEPLOYMENTS as SCORERS  # noqa: E402  scorer name -> deployment name

MODES = {
    "on": None,  # the batching of the config's own `scorers:` section
    "off": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
}
# The scorers' serving before the scoring-throughput work, for the before/after table: one deployment per model,
# no CPU reserved (so Ray gives each replica one thread), batch 16 for every model.
BEFORE = {
    "layout": "separate",
    **{name: {"batch": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}, "num_cpus": 0} for name in SCORERS},
}
PROFILES = ("shipped", "before")
PROMPT = "Artisan coffee that starts your morning right, in a sunlit corner cafe"

# ---------------------------------------------------------------- models


def bench_models(root: Path, build: bool = True) -> dict[str, dict]:
    """load_scorer options of the four bench-shape models under root (scorers/shapes/bench.json;
    built once, reused after)."""
    from scorers.tiny import COMPLETE, build_tiny_models

    root = root.resolve()
    if not build and not all((root / name / COMPLETE).exists() for name in SCORERS):
        raise SystemExit(f"--skip-build: the models under {root} are not built; run once without --skip-build")
    started = time.perf_counter()
    options = build_tiny_models(root, shapes="bench")
    print(f"bench models ready in {time.perf_counter() - started:.1f} s", flush=True)
    return options


# ---------------------------------------------------------------- the app under `serve run`


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, port: int, models: dict[str, dict], batching: dict | None, profile: str = "shipped",
                 layout: str | None = None) -> Path:
    """serve_config.offline.yaml with a free port and the bench models; its `scorers:` section as
    shipped (profile "shipped") or as it was before the scoring-throughput work ("before"), optionally another
    layout, and with batching "off" every deployment's batch at 1."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.offline.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["public_base_url"] = f"http://127.0.0.1:{port}"
    [app] = config["applications"]
    app["args"].pop("offline_models_dir", None)
    app["args"]["pipeline"]["scoring"].update(models)
    if profile == "before":
        app["args"]["scorers"] = json.loads(json.dumps(BEFORE))
    section = app["args"]["scorers"]
    if layout:
        section["layout"] = layout
    if batching is not None:  # the scorers' Serve options derive from the typed args.scorers
        for name in [*SCORERS, "colocated"]:
            entry = section.setdefault(name, {})
            entry["batch"] = {**entry.get("batch", {}), **batching}
            entry["batch"].pop("model_max_batch_size", None)
    path = directory / "serve_config.bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class ServeRun:
    """`serve run CONFIG` in its own process group and its own local Ray cluster (RAY_ADDRESS=local);
    the benchmark joins that cluster as a driver for handles."""

    def __init__(self, directory: Path, config: Path, port: int):
        self.directory, self.config, self.base = directory, config, f"http://127.0.0.1:{port}"
        self.log = (directory / "serve.log").open("w")
        self.process = subprocess.Popen(
            [str(BIN / "serve"), "run", config.name], cwd=directory, env={**os.environ, **ENV, "RAY_ADDRESS": "local"},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_healthy(self, timeout_s: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/api/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.base}/api/ready did not answer 200 within {timeout_s} s; see {self.log.name}")

    def gcs_address(self) -> str:
        """The GCS address of the cluster this `serve run` started: its gcs_server (in our process
        group) is started with port 0 and writes the port it took into its session directory."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) != self.process.pid:
                    continue
                args = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")]
            except (OSError, ProcessLookupError):
                continue
            if args and args[0].endswith("gcs_server"):
                options = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
                session = Path(options["log_dir"]).parent
                ip = options.get("node-ip-address") or options.get("node_ip_address") or "127.0.0.1"
                for _ in range(60):
                    ports = list(session.glob("gcs_server_port_*"))
                    if ports and ports[0].read_text().strip():
                        return f"{ip}:{ports[0].read_text().strip()}"
                    time.sleep(1)
        raise RuntimeError("the gcs_server of the serve run cluster was not found")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers of its cluster (raylet, workers), ours only
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()


# ---------------------------------------------------------------- measurements


def _utc(text: str) -> float:
    stamp = datetime.fromisoformat(text)
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()


def job_times(db: Path, ids: list[str]) -> dict[str, tuple[float, float]]:
    """created_at and updated_at (the last write: completion) of each job, as epoch seconds."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            f"SELECT generation_id, created_at, updated_at FROM jobs WHERE generation_id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
    return {gid: (_utc(created), _utc(updated)) for gid, created, updated in rows}


async def run_generations(base: str, headers: dict, count: int, body: dict, poll_s: float = 0.5) -> tuple[list[dict], float]:
    """Submit `count` generations at once; return their final statuses and the submission time."""
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        started = time.time()

        async def one(i: int) -> dict:
            # One user per generation, as in production: the admission limits cap one user's
            # active generations (args.limits.max_active_per_user).
            from deployments.auth import mint_token

            headers = {"Authorization": f"Bearer {mint_token(SECRET, f'bench-{i}')}"}
            reply = await client.post(f"{base}/api/generate", json={**body, "prompt": f"{PROMPT} (take {i + 1})"}, headers=headers)
            reply.raise_for_status()
            url = urljoin(base + "/", reply.json()["status_url"])  # relative when public_base_url is unset
            while True:
                status = (await client.get(url, headers=headers)).json()
                if status["status"] in ("completed", "failed"):
                    return status
                await asyncio.sleep(poll_s)

        statuses = await asyncio.gather(*(one(i) for i in range(count)))
    return list(statuses), started


TEXT_SCORERS = {name: deployment for name, deployment in SCORERS.items() if name != "consistency"}


def scoring_handles(layout: str) -> dict:
    """Handles of the scoring deployments of `layout`: the four text-image scorers and
    consistency by name (separate), or "scoring" (colocated: it holds all five models)."""
    from ray import serve

    from deployments.app import COLOCATED_DEPLOYMENT

    names = SCORERS if layout == "separate" else {"scoring": COLOCATED_DEPLOYMENT}  # Scoring holds consistency too
    return {name: serve.get_deployment_handle(dep, app_name="sceneref") for name, dep in names.items()}


def scoring_client(handles: dict, by_reference: bool = True):
    """The ingress's adapter for these handles: what the runner scores through."""
    from deployments.adapters import HandleColocatedScoring, HandleScoring

    if "scoring" in handles:
        return HandleColocatedScoring(handles["scoring"], list(TEXT_SCORERS))
    return HandleScoring({name: handles[name] for name in TEXT_SCORERS}, by_reference=by_reference)


async def batch_sizes(handles: dict) -> dict[str, list[int]]:
    """Recent forward-pass sizes per model (for colocated: each model's passes, and "passes",
    the images per coalesced pass of the Scoring replica)."""
    sizes = {}
    if "scoring" in handles:
        sizes.update(await handles["scoring"].model_batch_sizes.remote())
        sizes["passes"] = await handles["scoring"].recent_batch_sizes.remote()
    for name, handle in handles.items():
        if name != "scoring":
            sizes[name] = await handle.recent_batch_sizes.remote()
    return sizes


def cpu_snapshot(group: int) -> dict:
    """CPU seconds so far of `serve run` and all its descendants, by process title
    (Ray names its workers `ray::ServeReplica:APP:DEPLOYMENT`), and the machine's busy and idle
    seconds (/proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except (OSError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, title)
    # serve run's descendants (Ray's workers are the raylet's children, in sessions of their own)
    ours, grew = {group}, True
    while grew:
        grew = False
        for pid, (parent, _, _) in procs.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    by_title: dict[str, float] = {}
    for pid in ours & set(procs):
        _, seconds, title = procs[pid]
        title = title.split(" ")[0].rsplit("/", 1)[-1] or "?"
        by_title[title] = by_title.get(title, 0.0) + seconds
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = (cpu[3] + cpu[4]) / tick
    return {"processes": by_title, "busy": sum(cpu) / tick - idle, "idle": idle}


def cpu_share(before: dict, after: dict) -> dict:
    """Where the machine's CPU went between two snapshots: each process title's share of all
    CPU time (busy + idle), the idle share, and 'other' (processes outside serve run's group:
    this benchmark, the rest of the machine)."""
    total = (after["busy"] - before["busy"]) + (after["idle"] - before["idle"])
    shares = {title: (after["processes"].get(title, 0.0) - before["processes"].get(title, 0.0)) / total
              for title in after["processes"]}
    shares = {title: share for title, share in sorted(shares.items(), key=lambda kv: -kv[1]) if share >= 0.005}
    shares["idle"] = (after["idle"] - before["idle"]) / total
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


async def throughput(app: ServeRun, headers: dict, handles: dict, concurrency: int, variations: int) -> dict:
    before = await batch_sizes(handles)
    cpu_before = cpu_snapshot(app.process.pid)
    body = {"target_duration": 9, "advanced_image_num_variations": variations, "advanced_image_max_enhancement_iterations": 1}
    # Completion times come from the job store, so slow polling loses no precision and keeps
    # the status route's load (JWT, SQLite, URL signing on the ingress) off the busy cores.
    statuses, started = await run_generations(app.base, headers, concurrency, body, poll_s=2.0)
    cpu = cpu_share(cpu_before, cpu_snapshot(app.process.pid))
    failed = [s for s in statuses if s["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} generation(s) failed: {failed[0].get('error')}")
    times = job_times(app.directory / "output/serve/sceneref.db", [s["generation_id"] for s in statuses])
    wall = max(done for _, done in times.values()) - started
    scenes = sum(len(s["storyboard_plan"]["scenes"]) for s in statuses)
    after = await batch_sizes(handles)
    sizes = {name: after[name][len(before[name]):] for name in after}
    images = scenes * variations
    return {
        "concurrency": concurrency, "generations": concurrency, "scenes": scenes, "images": images, "wall_s": wall,
        "images_per_s": images / wall, "cpu": cpu,
        "batches": {name: {"count": len(s), "mean": statistics.fmean(s) if s else 0.0, "max": max(s, default=0),
                           "images": sum(s)} for name, s in sizes.items()},
    }


async def timed(awaitable):
    started = time.perf_counter()
    result = await awaitable
    return result, time.perf_counter() - started


async def scene_path(generator, scoring, prompt: str, reference: bytes | None, variations: int) -> tuple[float, float, bytes]:
    """One scene's critical path measured through the handles: one image generation (the runner
    generates a scene's variations concurrently), then scoring all `variations` images (one
    request per image and scorer, all in flight at once, exactly as the runner's HandleScoring)."""
    from deployments.adapters import HandleImages

    images = HandleImages(generator)
    first, t_image = await timed(images.generate(prompt, reference=reference, variation=1))
    others = await asyncio.gather(*(images.generate(prompt, reference=reference, variation=k) for k in range(2, variations + 1)))
    data = [first.data] + [o.data for o in others]
    _, t_score = await timed(scoring.score(data, [prompt] * len(data)))
    return t_image, t_score, first.data


def trace_timeline(traces: Path, created: float, finished: float) -> dict:
    """Stages of the generation as the trace files' modification times show them."""
    scenes = sorted((p for p in traces.iterdir() if p.name.startswith("scene_")), key=lambda p: int(p.name.split("_")[1]))
    enhanced = max((s / "final_enhanced_prompt.txt").stat().st_mtime for s in scenes)
    rows, previous = [], enhanced
    for scene in scenes:
        images = max(p.stat().st_mtime for p in scene.glob("image_*.png"))
        scored = (scene / "quality_scores.json").stat().st_mtime
        selected = (scene / "selected_best.txt").stat().st_mtime
        rows.append({"scene": int(scene.name.split("_")[1]), "images_s": images - previous, "scoring_s": scored - images,
                     "select_s": selected - scored})
        previous = selected
    return {"planning_enhancement_s": enhanced - created, "scenes": rows, "after_last_scene_s": finished - previous}


async def end_to_end(app: ServeRun, headers: dict, handles: dict, generator) -> dict:
    body = {"target_duration": 15, "advanced_image_num_variations": 4, "advanced_image_max_enhancement_iterations": 4}
    [status], started = await run_generations(app.base, headers, 1, body, poll_s=0.2)
    if status["status"] != "completed":
        raise RuntimeError(f"end-to-end generation failed: {status.get('error')}")
    gid = status["generation_id"]
    created, finished = job_times(app.directory / "output/serve/sceneref.db", [gid])[gid]
    timeline = trace_timeline(app.directory / "output/serve/reference_image_traces" / gid, created, finished)
    # The same scenes' critical path, measured afterwards on the idle app through the handles.
    scoring = scoring_client(handles)
    reference, per_scene = None, []
    for scene in status["storyboard_plan"]["scenes"]:
        t_image, t_score, reference = await scene_path(generator, scoring, scene["enhanced_prompt"], reference, 4)
        per_scene.append({"scene": scene["scene_number"], "image_s": t_image, "score4_s": t_score})
    critical = timeline["planning_enhancement_s"] + sum(s["image_s"] + s["score4_s"] for s in per_scene)
    return {
        "generation_id": gid, "scenes": len(status["storyboard_plan"]["scenes"]),
        "wall_s": finished - started, "server_wall_s": finished - created, "critical_s": critical,
        "critical_per_scene": per_scene, "timeline": timeline,
    }


class Meter:
    """Serialized bytes the ingress hands to Ray on its way to the scorers, measured with Ray's
    serializer: the arguments of each scorer call (a top-level ObjectRef argument travels as its
    id and owner address) and each image put into the object store."""

    def __init__(self):
        import ray

        self.context = ray._private.worker.global_worker.get_serialization_context()
        self.call_bytes = self.put_bytes = self.calls = self.puts = 0

    def size(self, value) -> int:
        return self.context.serialize(value).total_bytes

    def handles(self, handles: dict) -> dict:
        meter = self

        class Method:
            def __init__(self, method):
                self.method = method

            def remote(self, *args):
                meter.calls += 1
                meter.call_bytes += sum(meter.size(a) for a in args)
                return self.method.remote(*args)

        class Handle:
            def __init__(self, handle):
                self.score_text = Method(handle.score_text)

        return {name: Handle(h) for name, h in handles.items()}

    def put(self, data: bytes):
        import ray

        self.puts += 1
        self.put_bytes += self.size(data)
        return ray.put(data)


async def scene_bytes(generator, handles: dict, variations: int) -> dict:
    """One scene's images scored inline (before) and by reference (after): bytes per
    scene, as Ray serializes them, and the adapter's own count of image bytes."""
    from deployments.adapters import HandleImages, HandleScoring

    handles = {name: handles[name] for name in TEXT_SCORERS}
    images = HandleImages(generator)
    made = await asyncio.gather(*(images.generate(PROMPT, reference=None, variation=k) for k in range(1, variations + 1)))
    data = [m.data for m in made]
    result = {"variations": variations, "image_bytes": [len(d) for d in data], "scorers": len(handles)}
    scores = {}
    for mode, by_reference in (("inline", False), ("by_reference", True)):
        meter = Meter()
        scoring = HandleScoring(meter.handles(handles), by_reference=by_reference)
        scoring.put = meter.put
        scores[mode] = await scoring.score(data, [PROMPT] * len(data))
        result[mode] = {"calls": meter.calls, "call_bytes": meter.call_bytes, "puts": meter.puts,
                        "put_bytes": meter.put_bytes, "total_bytes": meter.call_bytes + meter.put_bytes,
                        "adapter_count": scoring.sent.total}
    result["same_scores"] = all(
        abs(a[n].score - b[n].score) < 1e-3 for a, b in zip(scores["inline"], scores["by_reference"]) for n in a
    )
    return result


async def warm_up(generator, handles: dict) -> None:
    """First forward passes allocate and initialise: keep them out of the figures."""
    scoring = scoring_client(handles)
    for _ in range(2):
        _, _, image = await scene_path(generator, scoring, PROMPT, None, 2)
    await scoring.score([image], [PROMPT])


def scored_inputs(traces: Path) -> list[tuple[bytes, str]]:
    """Every variation the run scored, with the text it was scored against, from its traces."""
    pairs = []
    for path in sorted(traces.glob("*/scene_*/quality_scores.json")):
        info = json.loads(path.read_text())
        text = (info.get("scoring") or {}).get("text") or info["prompt"]
        pairs += [((path.parent / v["image"]).read_bytes(), text) for v in info["variations"] if v.get("image")]
    return pairs


def consistency_inputs(traces: Path) -> list[tuple[bytes, bytes]]:
    """Every (variation, reference) pair the run's consistency model compared, from its traces:
    each variation of scene 2 on against the selected image of each scene it names."""
    pairs = []
    for generation in sorted(p for p in traces.iterdir() if p.is_dir()):
        selected = {}
        for scene in generation.glob("scene_*"):
            first = (scene / "selected_best.txt").read_text().splitlines()[0] if (scene / "selected_best.txt").exists() else ""
            if first.startswith("selected: "):
                selected[int(scene.name.split("_")[1])] = (scene / first.split(": ", 1)[1].strip()).read_bytes()
        for path in sorted(generation.glob("scene_*/quality_scores.json")):
            for v in json.loads(path.read_text())["variations"]:
                for ref in ((v.get("consistency") or {}).get("references") or []) if v.get("image") else []:
                    pairs.append(((path.parent / v["image"]).read_bytes(), selected[ref["scene_number"]]))
    return pairs


def measure_limit(pairs: list[tuple[bytes, str]], models: dict, batch: int, threads: int, repeats: int = 2,
                  sweep: list[int] | None = None, consistency_pairs: list[tuple[bytes, bytes]] = ()) -> dict:
    """The four models' own limit on this machine: one process, `threads` torch threads, the
    run's images and texts in batches of `batch`, each batch decoded once and scored by every
    model through `score()` (what a replica does, without Serve). Also timed: each model alone,
    and the bare forward passes (preprocessing done beforehand). Best of `repeats`."""
    import torch

    import scorers
    from scorers.images import SCORER_INPUT, open_image

    torch.set_num_threads(threads)
    loaded = {name: scorers.load_scorer(name, **{**models[name], "device": "cpu", "dtype": "fp32"}) for name in TEXT_SCORERS}
    chunks = [pairs[i : i + batch] for i in range(0, len(pairs), batch)]
    for model in loaded.values():  # first passes allocate: not timed
        model.score([open_image(chunks[0][0][0], SCORER_INPUT)], [chunks[0][0][1]])
    best, per_model = float("inf"), {name: float("inf") for name in loaded}
    for _ in range(repeats):
        seconds = {name: 0.0 for name in loaded}
        started = time.perf_counter()
        for chunk in chunks:
            t = time.perf_counter()
            images = [open_image(data, SCORER_INPUT) for data, _ in chunk]
            decode = time.perf_counter() - t
            for name, model in loaded.items():
                t = time.perf_counter()
                model.score(images, [text for _, text in chunk])
                seconds[name] += time.perf_counter() - t + decode / len(loaded)
        best = min(best, time.perf_counter() - started)
        per_model = {name: min(per_model[name], seconds[name]) for name in loaded}
    result = {"images": len(pairs), "batch": batch, "threads": threads, "seconds": best, "images_per_s": len(pairs) / best,
              "model_share": {name: t / sum(per_model.values()) for name, t in per_model.items()}}
    if consistency_pairs:
        # The run's consistency work, as the service does it: each distinct image decoded and
        # embedded once (scorers.ensemble.EmbeddingCache), then one cosine per pair.
        from deployments.scorer import content_key
        from scorers.ensemble import EmbeddingCache

        model = scorers.load_scorer("consistency", **{**models["consistency"], "device": "cpu", "dtype": "fp32"})
        model.score([open_image(consistency_pairs[0][0], SCORER_INPUT)], [open_image(consistency_pairs[0][1], SCORER_INPUT)])
        keyed = [(content_key(a), a, content_key(b), b) for a, b in consistency_pairs]
        seconds = float("inf")
        for _ in range(repeats):
            cache = EmbeddingCache(model)
            started = time.perf_counter()
            for i in range(0, len(keyed), batch // 2):  # about `batch` images embedded per pass
                cache.similarity(keyed[i : i + batch // 2], lambda data: open_image(data, SCORER_INPUT))
            seconds = min(seconds, time.perf_counter() - started)
        result["consistency"] = {"pairs": len(keyed), "embedded": cache.embedded, "seconds": seconds}
        result["four_models_images_per_s"] = result["images_per_s"]
        result["seconds"] = best + seconds
        result["images_per_s"] = len(pairs) / result["seconds"]
    if sweep:
        # Per model, milliseconds per image at each batch size (decoded beforehand): where a
        # smaller batch is cheaper per image, `model_max_batch_size` caps that model's passes.
        images = [(open_image(data, SCORER_INPUT), text) for data, text in pairs]
        result["sweep"] = {}
        for name, model in loaded.items():
            row = {}
            for size in sweep:
                started = time.perf_counter()
                for i in range(0, len(images), size):
                    chunk = images[i : i + size]
                    model.score([image for image, _ in chunk], [text for _, text in chunk])
                row[size] = 1000 * (time.perf_counter() - started) / len(images)
            result["sweep"][name] = row
    return result


def config_layout(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["applications"][0]["args"]["scorers"].get("layout", "separate")


def bench_mode(mode: str, args, models: dict, run: str = "shipped") -> dict:
    import ray

    from deployments.auth import mint_token

    profile, _, layout = run.partition(":")
    directory = (args.work_dir / f"{run.replace(':', '-')}-{mode}").resolve()
    if directory.exists():
        import shutil

        shutil.rmtree(directory)  # a stale job store would make the ingress resume old jobs
    directory.mkdir(parents=True)
    port = args.port or free_port()
    config = write_config(directory, port, models, MODES[mode], profile, layout or None)
    layout = config_layout(config)
    print(f"\n== {run}, layout {layout}, batching {mode}: serve run {config} (port {port})", flush=True)
    app = ServeRun(directory, config, port)
    result: dict = {"run": run, "profile": profile, "layout": layout, "mode": mode, "user_config": MODES[mode]}
    try:
        started = time.perf_counter()
        app.wait_healthy()
        result["startup_s"] = time.perf_counter() - started
        print(f"healthy after {result['startup_s']:.0f} s", flush=True)
        ray.init(address=app.gcs_address(), log_to_driver=False, logging_level="ERROR")
        from ray import serve

        handles = scoring_handles(layout)
        generator = serve.get_deployment_handle("ImageGenerator", app_name="sceneref")
        headers = {"Authorization": f"Bearer {mint_token(SECRET, 'bench')}"}
        asyncio.run(warm_up(generator, handles))
        if args.bytes and layout == "separate":
            result["bytes"] = asyncio.run(scene_bytes(generator, handles, args.variations))
            b = result["bytes"]
            print(f"  bytes per scene to the scorers ({b['variations']} images, {b['scorers']} scorers): "
                  f"inline {b['inline']['total_bytes']:,}, by reference {b['by_reference']['total_bytes']:,}", flush=True)
        result["throughput"] = []
        for concurrency in args.concurrency:
            row = asyncio.run(throughput(app, headers, handles, concurrency, args.variations))
            result["throughput"].append(row)
            batches = ", ".join(f"{n} {b['mean']:.1f}/{b['max']}" for n, b in row["batches"].items())
            print(f"  {concurrency:>2} generations: {row['images']} images in {row['wall_s']:.1f} s = "
                  f"{row['images_per_s']:.2f} images/s; batch mean/max: {batches}", flush=True)
        if not args.no_e2e:
            result["e2e"] = asyncio.run(end_to_end(app, headers, handles, generator))
            e2e = result["e2e"]
            print(f"  4-scene generation: wall {e2e['wall_s']:.1f} s, critical path {e2e['critical_s']:.1f} s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        app.stop()
    if args.limit and result["throughput"]:
        # The app is stopped: the machine is quiet again. The same images and texts, in one process.
        traces = directory / "output/serve/reference_image_traces"
        pairs = scored_inputs(traces)
        result["limit"] = measure_limit(pairs, models, args.limit_batch, os.cpu_count() or 1, sweep=args.sweep,
                                        consistency_pairs=consistency_inputs(traces))
        lim = result["limit"]
        for row in result["throughput"]:
            row["of_limit"] = row["images_per_s"] / lim["images_per_s"]
            row["of_four_model_limit"] = row["images_per_s"] / lim.get("four_models_images_per_s", lim["images_per_s"])
        c = lim.get("consistency", {"pairs": 0, "embedded": 0, "seconds": 0.0})
        print(f"  limit: {lim['images']} images in one process at batch {lim['batch']}, {lim['threads']} threads, "
              f"the four models and the run's {c['pairs']} consistency pairs ({c['embedded']} images embedded, "
              f"{c['seconds']:.1f} s): {lim['images_per_s']:.2f} images/s (four models alone "
              f"{lim.get('four_models_images_per_s', lim['images_per_s']):.2f}); served / limit at "
              f"{args.concurrency[-1]} generations: {result['throughput'][-1]['of_limit']:.2f} "
              f"(against the four alone {result['throughput'][-1]['of_four_model_limit']:.2f})", flush=True)
    return result


# ---------------------------------------------------------------- report

BATCH_COLUMNS = [*TEXT_SCORERS, "consistency"]


def report(results: list[dict], args) -> None:
    print(f"\nMachine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), no GPU; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"Scoring throughput through the ingress (target_duration 9 -> 3 scenes, {args.variations} variations, "
          "1 enhancement iteration); an image = all four scorers (and consistency from scene 2); limit = the same "
          "four models on the run's images in one process; batch sizes are mean/max per model\n")
    print("| scorers | layout | batching | generations | images | wall | images/s | limit images/s | served / limit | "
          "four-model limit | served / four-model limit | " + " | ".join(BATCH_COLUMNS) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(BATCH_COLUMNS))
    for result in results:
        limit = result.get("limit")
        for row in result["throughput"]:
            batches = " | ".join(
                f"{row['batches'][n]['mean']:.1f} / {row['batches'][n]['max']}" if n in row["batches"] else "-"
                for n in BATCH_COLUMNS
            )
            lim = (f"{limit['images_per_s']:.2f} | {row['of_limit']:.2f} | "
                   f"{limit.get('four_models_images_per_s', limit['images_per_s']):.2f} | {row['of_four_model_limit']:.2f}"
                   if limit else "- | - | - | -")
            print(f"| {result['run']} | {result['layout']} | {result['mode']} | {row['concurrency']} | {row['images']} | "
                  f"{row['wall_s']:.1f} s | {row['images_per_s']:.2f} | {lim} | {batches} |")
    for result in results:
        for row in result["throughput"]:
            if row.get("cpu"):
                shares = ", ".join(f"{title} {share:.0%}" for title, share in row["cpu"].items())
                print(f"\n{result['run']}, {row['concurrency']} generations: the machine's CPU during the run: {shares}")
    for result in (r for r in results if r.get("limit")):
        share = ", ".join(f"{n} {v:.0%}" for n, v in result["limit"]["model_share"].items())
        print(f"\n{result['run']}: the limit's time per model: {share}")
        sweep = result["limit"].get("sweep")
        if sweep:
            sizes = list(next(iter(sweep.values())))
            print("\n| ms per image at batch | " + " | ".join(map(str, sizes)) + " |")
            print("|---|" + "---|" * len(sizes))
            for name, row in sweep.items():
                print(f"| {name} | " + " | ".join(f"{row[size]:.1f}" for size in sizes) + " |")
    for result in (r for r in results if "bytes" in r):
        b = result["bytes"]
        print(f"\nBytes per scene to the scorers (images by reference), batching {result['mode']}: {b['variations']} images of "
              f"{', '.join(f'{n:,}' for n in b['image_bytes'])} bytes, {b['scorers']} scorers; same scores: {b['same_scores']}\n")
        print("| images sent | scorer calls | bytes in call arguments | ray.put | bytes put | total per scene | adapter count |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("inline", "by_reference"):
            m = b[mode]
            print(f"| {mode.replace('_', ' ')} | {m['calls']} | {m['call_bytes']:,} | {m['puts']} | {m['put_bytes']:,} | "
                  f"{m['total_bytes']:,} | {m['adapter_count']:,} |")
    e2es = [r for r in results if "e2e" in r]
    if e2es:
        print("\n4-scene generation (target_duration 15, 4 variations, up to 4 iterations): wall vs critical path\n")
        print("| scorers | batching | wall | critical path | wall / critical | planning + enhancement | per scene: image + scoring 4 (handles) | per scene in the run: images + scoring (traces) |")
        print("|---|---|---|---|---|---|---|---|")
        for result in e2es:
            e = result["e2e"]
            direct = ", ".join(f"{s['image_s']:.2f}+{s['score4_s']:.2f}" for s in e["critical_per_scene"])
            traced = ", ".join(f"{s['images_s']:.2f}+{s['scoring_s']:.2f}" for s in e["timeline"]["scenes"])
            print(f"| {result['run']} | {result['mode']} | {e['wall_s']:.1f} s | {e['critical_s']:.1f} s | "
                  f"{e['wall_s'] / e['critical_s']:.2f}x | {e['timeline']['planning_enhancement_s']:.2f} s | {direct} | {traced} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent generations")
    parser.add_argument("--variations", type=int, default=2, help="variations per scene in the throughput runs (2-8)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="batching on and/or off")
    parser.add_argument("--runs", nargs="+", default=["shipped"],
                        help="scorer serving to compare: PROFILE[:LAYOUT], PROFILE 'shipped' (the `scorers:` of "
                        "serve_config.offline.yaml) or 'before' (the serving before the scoring-throughput work), LAYOUT separate or colocated")
    parser.add_argument("--skip-build", action="store_true", help="use the models already in --models-dir")
    parser.add_argument("--no-e2e", action="store_true", help="skip the 4-scene end-to-end generation")
    parser.add_argument("--no-limit", dest="limit", action="store_false", help="skip the in-process limit")
    parser.add_argument("--limit-batch", type=int, default=16, help="batch size of the in-process limit")
    parser.add_argument("--sweep", type=int, nargs="*", help="after the limit, each model's ms per image at these batch sizes")
    parser.add_argument("--bytes", action="store_true", help="also measure bytes per scene (inline against by reference; separate layout)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port of serve run (default: a free one)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "output/bench-models")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "output/bench-serving")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for run in args.runs:
        profile, _, layout = run.partition(":")
        if profile not in PROFILES or layout not in ("", "separate", "colocated"):
            parser.error(f"--runs {run!r}: use PROFILE[:LAYOUT] with PROFILE in {PROFILES} and LAYOUT separate or colocated")

    models = bench_models(args.models_dir, build=not args.skip_build)
    started = time.perf_counter()
    if len(args.modes) == 1 and len(args.runs) == 1:
        results = [bench_mode(args.modes[0], args, models, args.runs[0])]
    else:
        # One process per run: Serve's handles and routers in a driver outlive ray.shutdown() and
        # would keep talking to the first cluster's replicas.
        results = []
        for run in args.runs:
            for mode in args.modes:
                out = (args.work_dir / f"{run.replace(':', '-')}-{mode}.json").resolve()
                argv = [sys.executable, __file__, "--skip-build", "--modes", mode, "--runs", run, "--json", str(out),
                        "--concurrency", *map(str, args.concurrency), "--variations", str(args.variations),
                        "--limit-batch", str(args.limit_batch), "--port", str(args.port),
                        "--models-dir", str(args.models_dir), "--work-dir", str(args.work_dir)]
                argv += ["--no-e2e"] if args.no_e2e else []
                argv += ["--no-limit"] if not args.limit else []
                argv += ["--bytes"] if args.bytes else []
                argv += ["--sweep", *map(str, args.sweep)] if args.sweep else []
                subprocess.run(argv, check=True)
                results += json.loads(out.read_text())
    report(results, args)
    print(f"\nbenchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
