"""GPU scoring benchmark (scoring throughput): fully scored variations/s for the real model shapes at
fp16/bf16, in both scoring layouts, against the same models' own limit in the same run.

    .venv/bin/python benchmarks/gpu_scoring.py --device cuda --dtypes fp16 bf16 \\
        --layouts separate colocated --shapes real --json output/gpu-scoring.json
    .venv/bin/python benchmarks/gpu_scoring.py --smoke --json out.json   # CPU, fp32, tiny shapes

Models: random weights in the real architectures (scorers/shapes/real.json, built once by
scorers.tiny into --models-dir in half precision; timing does not depend on weight values).
Images: provider-sized PNGs (1536x1024 and 1024x1024) with photograph-like content, so their
PNG sizes and decode cost are realistic; prompts from PartiPrompts when ../shared/data has them.

Per dtype (and input path), each phase in a process of its own, so GPU memory and Serve state
never carry over from one phase to the next:
  limit   the four scorers in one process on the device: bytes -> decode (once per image) ->
          score() at each scorer's batch size, and bare forward passes on ready tensors.
  served  the app (deployments.app.build, offline providers) on a local Ray cluster started in
          the phase process, one layout at a time: `separate` (a deployment per scorer, the GPU
          fractions and batch sizes of serve_config.yaml) or `colocated` (one Scoring deployment
          on one GPU, the same sizes as per-model limits); --concurrency clients each score a
          scene of --variations images at once through the runner's adapters, --scenes times.
GPU utilisation and used memory are sampled during the served run (NVML, else nvidia-smi);
each replica reports its peak memory (device_stats). On a CPU those are marked unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {"RAY_AUTH_MODE": "disabled", "SCENEREF_JWT_SECRET": "gpu-bench-" + "x" * 40, "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(ENV)

SCORERS = ("pickscore", "clipscore", "vqascore", "aesthetic")
SIZES = ((1536, 1024), (1024, 1024))  # OpenAI gpt-image landscape and square
PARTI = ROOT.parent / "shared/data/prompts/PartiPrompts.tsv"
FIXED_PROMPTS = [
    "Artisan coffee that starts your morning right, in a sunlit corner cafe",
    "a red bicycle leaning on a brick wall at sunset, shallow depth of field",
    "a lighthouse on a cliff at dusk, warm rim light, waves crashing below",
    "a child flying a kite on a windy beach, wide shot, overcast sky",
]
SMOKE = {"device": "cpu", "dtypes": ["fp32"], "shapes": "tiny", "images": 8, "distinct": 4, "concurrency": 4,
         "variations": 2, "scenes": 3}
UNAVAILABLE_CPU = "not available: the device is a CPU (no GPU counters)"

# ---------------------------------------------------------------- inputs


def photo_png(seed: int, size: tuple[int, int]) -> bytes:
    """A photograph-like PNG: a lit gradient, soft structure at several scales, hard-edged
    shapes and sensor grain. Flat or pure-noise images would make PNG sizes and decode times
    unlike the providers' (about 1.5-3 MB at 1536x1024)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    pixels = rng.uniform(60, 220, 3) * (1 - y) + rng.uniform(20, 160, 3) * y + 30 * x * rng.uniform(-1, 1, 3)
    for cells, amplitude in ((4, 40), (16, 22), (64, 10)):
        small = rng.normal(0, 1, (max(1, cells * h // w), cells, 3)).astype(np.float32)
        smooth = [np.asarray(Image.fromarray(small[..., c], mode="F").resize((w, h), Image.Resampling.BICUBIC)) for c in range(3)]
        pixels = pixels + amplitude * np.stack(smooth, axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(w // 20, w // 4), y0 + rng.integers(h // 20, h // 4)]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 3.0, (h, w, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def prompts(n: int) -> tuple[list[str], str]:
    """n prompts and where they came from (PartiPrompts, Apache-2.0, when the shared data is here)."""
    if PARTI.is_file():
        rows = [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1:] if line.strip()]
        rows = [row for row in rows if len(row.split()) >= 4] or rows
        return [rows[(i * 37) % len(rows)] for i in range(n)], f"PartiPrompts ({PARTI})"
    return [FIXED_PROMPTS[i % len(FIXED_PROMPTS)] for i in range(n)], "fixed prompts (PartiPrompts not found)"


def serve_config_scorers() -> dict:
    """The production scorers' serving (batch sizes, GPU fractions, CPUs) from serve_config.yaml."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return config["applications"][0]["args"]["scorers"]


# ---------------------------------------------------------------- measuring the device


class DeviceSampler:
    """GPU utilisation and used memory, sampled in a thread while a run goes on: NVML when the
    nvidia-ml-py package is there, else `nvidia-smi -lms`. On a CPU nothing is sampled and the
    result says so (no zeros that would read as figures)."""

    def __init__(self, device: str, interval_s: float = 0.2):
        self.device, self.interval_s = device, interval_s
        self.samples: list[tuple[float, float]] = []  # (utilisation %, used bytes)
        self.source, self.reason = None, None
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> "DeviceSampler":
        if not self.device.startswith("cuda"):
            self.reason = UNAVAILABLE_CPU
            return self
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "nvml"
            self.thread = threading.Thread(target=self._nvml, args=(pynvml, handle), daemon=True)
            self.thread.start()
            return self
        except Exception as exc:  # no package or no driver library: try the command line tool
            nvml_error = f"{type(exc).__name__}: {exc}"
        try:
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={int(self.interval_s * 1000)}"], stdout=subprocess.PIPE, text=True)
            self.source = "nvidia-smi"
            self.thread = threading.Thread(target=self._smi, daemon=True)
            self.thread.start()
        except OSError as exc:
            self.reason = f"not available: NVML ({nvml_error}) and nvidia-smi ({exc}) both failed"
        return self

    def _nvml(self, pynvml, handle) -> None:
        while not self.stop_event.wait(self.interval_s):
            rates, memory = pynvml.nvmlDeviceGetUtilizationRates(handle), pynvml.nvmlDeviceGetMemoryInfo(handle)
            self.samples.append((float(rates.gpu), float(memory.used)))

    def _smi(self) -> None:
        for line in self.process.stdout:
            try:
                utilisation, used_mib = (float(v) for v in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((utilisation, used_mib * 2**20))

    def stop(self) -> dict:
        self.stop_event.set()
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.reason:
            return {"available": False, "reason": self.reason}
        if not self.samples:
            return {"available": False, "reason": f"not available: {self.source} gave no samples during the run"}
        utilisation = [u for u, _ in self.samples]
        return {"available": True, "source": self.source, "samples": len(self.samples),
                "utilization_mean_pct": statistics.fmean(utilisation), "utilization_max_pct": max(utilisation),
                "memory_used_max_bytes": max(m for _, m in self.samples)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sizes(values: list[int]) -> dict:
    return {"count": len(values), "mean": statistics.fmean(values) if values else 0.0, "max": max(values, default=0),
            "images": sum(values)}


# ---------------------------------------------------------------- phase: limit


def bare_forward(name: str, scorer, images: list, texts: list[str]):
    """Ready tensors for one chunk (made here, untimed) and a call that runs only the model's
    forward pass on them: the ceiling that preprocessing and serving overheads are measured against.
    Built from the scorers' own preprocessing objects."""
    import torch

    device, dtype = scorer.device, scorer.dtype
    if name == "pickscore":
        pixels = scorer.image_processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)
        text = scorer.tokenizer(texts, padding=True, truncation=True, max_length=scorer.max_tokens, return_tensors="pt").to(device)
        return lambda: (scorer.model.get_image_features(pixel_values=pixels), scorer.model.get_text_features(**text))
    if name in ("clipscore", "aesthetic"):
        pixels = torch.stack([scorer.clip.preprocess(image) for image in images]).to(device, dtype)
        if name == "aesthetic":
            return lambda: scorer.head(scorer.clip.model.encode_image(pixels).float())
        tokens = scorer.clip.tokenizer(texts).to(device)
        return lambda: (scorer.clip.model.encode_image(pixels), scorer.clip.model.encode_text(tokens))
    if name == "vqascore":
        inputs = scorer.processor(text=[scorer.prompt_text(t) for t in texts], images=images, padding=True,
                                  return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return lambda: scorer.model(**inputs, logits_to_keep=1, use_cache=False)
    raise ValueError(name)


def phase_limit(plan: dict, dtype: str, input_path: str) -> dict:
    import torch

    import scorers
    from scorers.images import SCORER_INPUT, open_image

    device = scorers.base.resolve_device(plan["device"])
    threads = plan.get("limit_threads")
    if threads:
        torch.set_num_threads(threads)
    data = [Path(p).read_bytes() for p in plan["image_files"]]
    texts = plan["prompts"][: len(data)]
    started = time.perf_counter()
    models = {name: scorers.load_scorer(name, **plan["models"][name], device=str(device), dtype=dtype) for name in SCORERS}
    load_s = time.perf_counter() - started
    if input_path == "tensor":
        from scorers.images import decode_tensor

        decode = lambda b: decode_tensor(b, SCORER_INPUT)  # noqa: E731
    else:
        decode = lambda b: open_image(b, SCORER_INPUT)  # noqa: E731
    n = plan["limit_images"]
    pool = [data[i % len(data)] for i in range(n)]
    prompts_n = [texts[i % len(texts)] for i in range(n)]
    started = time.perf_counter()
    decoded = [decode(b) for b in pool]
    decode_s = time.perf_counter() - started
    pil = [open_image(b, SCORER_INPUT) for b in pool]  # bare forwards prepare from PIL images
    result = {"images": n, "model_load_s": load_s, "decode_s": decode_s, "decode_ms_per_image": 1000 * decode_s / n,
              "scorers": {}}
    with torch.inference_mode():
        for name, model in models.items():
            batch = plan["batches"][name]
            chunks = [(s, min(s + batch, n)) for s in range(0, n, batch)]
            model.score(decoded[:batch], prompts_n[:batch])  # warm-up: allocation, kernel choice
            sync(device)
            finite, score_s = True, float("inf")
            for _ in range(plan["repeats"]):  # the best of the repeats: other load only slows a run down
                seconds = 0.0
                for a, b in chunks:
                    t = time.perf_counter()
                    outs = model.score(decoded[a:b], prompts_n[a:b])
                    sync(device)
                    seconds += time.perf_counter() - t
                    finite &= all(math.isfinite(o.raw) for o in outs)
                score_s = min(score_s, seconds)
            row = {"batch": batch, "score_s": score_s, "images_per_s": n / score_s, "finite": finite}
            try:
                bare_forward(name, model, pil[:batch], prompts_n[:batch])()
                runs = [bare_forward(name, model, pil[a:b], prompts_n[a:b]) for a, b in chunks]
                forward_s = float("inf")
                for _ in range(plan["repeats"]):
                    seconds = 0.0
                    for run in runs:
                        sync(device)
                        t = time.perf_counter()
                        run()
                        sync(device)
                        seconds += time.perf_counter() - t
                    forward_s = min(forward_s, seconds)
                row.update(forward_s=forward_s, bare_images_per_s=n / forward_s)
            except Exception as exc:  # internals changed under us: say so rather than stop the run
                row.update(forward_s=None, bare_images_per_s=None, bare_error=f"{type(exc).__name__}: {exc}")
            result["scorers"][name] = row
            print(f"  limit {dtype}/{input_path} {name}: batch {batch}, {row['images_per_s']:.2f} img/s through score()"
                  + (f", {row['bare_images_per_s']:.2f} bare" if row.get("bare_images_per_s") else ""), flush=True)
    total = decode_s + sum(r["score_s"] for r in result["scorers"].values())
    result["images_per_s"] = n / total
    bare = [r["forward_s"] for r in result["scorers"].values()]
    result["bare_images_per_s"] = n / sum(bare) if all(b is not None for b in bare) else None
    if device.type == "cuda":
        result["memory"] = {"available": True, "max_memory_allocated": torch.cuda.max_memory_allocated(device),
                            "memory_reserved": torch.cuda.memory_reserved(device)}
    else:
        result["memory"] = {"available": False, "reason": UNAVAILABLE_CPU}
    return result


# ---------------------------------------------------------------- phase: served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(plan: dict, dtype: str, layout: str, input_path: str, work: Path):
    """AppArgs for the offline app with the benchmark's models and the layout's serving."""
    from deployments.args import AppArgs
    from pipeline.settings import ScoringSettings

    gpu = plan["device"].startswith("cuda")
    production = plan["serving"]
    scoring = {"device": plan["device"], "dtype": dtype, **{name: dict(plan["models"][name]) for name in plan["models"]}}
    if "input_path" in ScoringSettings.model_fields:
        scoring["input_path"] = input_path
    elif input_path != "pil":
        raise SystemExit("--input-paths tensor needs ScoringSettings.input_path (not in this checkout)")
    serving = {}
    for name in (*SCORERS, "consistency"):
        base = production.get(name, {})
        serving[name] = {
            "batch": {"max_batch_size": plan["batches"].get(name, base.get("batch", {}).get("max_batch_size", 16)),
                      "batch_wait_timeout_s": base.get("batch", {}).get("batch_wait_timeout_s", 0.02)},
            # One replica each, so batch sizes and memory are one replica's; GPU fractions as in production.
            "num_replicas": 1,
            "num_gpus": base.get("num_gpus", 0.0) if gpu else 0.0,
            "num_cpus": base.get("num_cpus", 1) if gpu else 0.25,
            "threads": int(base.get("num_cpus", 1)) if gpu else 1,
        }
    scorers_args = {"layout": layout, **serving}
    if layout == "colocated":
        scorers_args["colocated"] = {
            "batch": {"max_batch_size": max(plan["batches"][n] for n in SCORERS), "batch_wait_timeout_s": 0.02,
                      "model_max_batch_size": {n: plan["batches"][n] for n in SCORERS}},
            "num_replicas": 1, "num_gpus": 1.0 if gpu else 0.0, "num_cpus": plan["colocated_cpus"] if gpu else 0.25,
            "threads": plan["colocated_cpus"] if gpu else 2,
        }
    return AppArgs.model_validate({
        "database_url": f"sqlite:///{work / 'jobs.db'}",
        "pipeline": {
            "llm": {"provider": "offline", "model": "offline-agents"},
            "images": {"provider": "offline", "model": "offline-procedural", "size": "256x144"},
            "scoring": scoring,
            "traces": {"root": str(work / "traces"), "keep": False},
            "artifacts_dir": str(work / "artifacts"),
        },
        "jobs": {"run_jobs": False},  # no generations here: the clients call the scorers directly
        "auth": {"mode": "hs256"},
        "scorers": scorers_args,
    })


def start_ray(gpu: bool, attempts: int = 3) -> None:
    """A local Ray cluster of this process's own. On a loaded machine the raylet can miss Ray's
    fixed 30 s start window; a second try usually makes it."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=max(16, os.cpu_count() or 1), num_gpus=1 if gpu else 0,
                     include_dashboard=False, runtime_env={"env_vars": ENV}, log_to_driver=False, logging_level="ERROR")
            return
        except Exception as exc:
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            print(f"   Ray did not start ({exc}); trying again", flush=True)
            ray.shutdown()


def wait_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get("sceneref")
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the app failed to deploy: {app.message}")
        time.sleep(1)
    raise TimeoutError(f"the app was not RUNNING within {timeout_s} s")


async def clients(scoring, data: list[bytes], texts: list[str], concurrency: int, variations: int, scenes: int) -> int:
    """`concurrency` clients, each scoring `scenes` scenes of `variations` images one after the
    other (all of a scene's images at once, as the runner does); returns the images scored."""
    async def client(c: int) -> int:
        done = 0
        for s in range(scenes):
            first = (c * scenes + s) * variations
            batch = [data[(first + k) % len(data)] for k in range(variations)]
            results = await scoring.score(batch, [texts[(first + k) % len(texts)] for k in range(variations)])
            done += sum(1 for r in results if all(name in r for name in SCORERS))
        return done

    return sum(await asyncio.gather(*(client(c) for c in range(concurrency))))


def phase_served(plan: dict, dtype: str, layout: str, input_path: str) -> dict:
    import ray
    from ray import serve

    from deployments.adapters import HandleScoring
    from deployments.app import SCORER_DEPLOYMENTS, build

    work = Path(plan["work_dir"]) / f"served-{dtype}-{layout}-{input_path}"
    work.mkdir(parents=True, exist_ok=True)
    gpu = plan["device"].startswith("cuda")
    args = app_args(plan, dtype, layout, input_path, work)
    start_ray(gpu)
    result: dict = {"layout": layout}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        started = time.perf_counter()
        serve.run(build(args), name="sceneref", route_prefix="/", blocking=False)
        wait_running(plan["startup_timeout_s"])
        result["startup_s"] = time.perf_counter() - started
        if layout == "colocated":
            from deployments.adapters import HandleColocatedScoring
            from deployments.app import COLOCATED_DEPLOYMENT

            deployments = {"scoring": COLOCATED_DEPLOYMENT}
            handle = serve.get_deployment_handle(COLOCATED_DEPLOYMENT, app_name="sceneref")
            handles = {"scoring": handle}
            scoring = HandleColocatedScoring(handle, list(SCORERS))
        else:
            deployments = {name: SCORER_DEPLOYMENTS[name] for name in SCORERS}
            handles = {name: serve.get_deployment_handle(dep, app_name="sceneref") for name, dep in deployments.items()}
            scoring = HandleScoring(handles)
        data = [Path(p).read_bytes() for p in plan["image_files"]]
        texts = plan["prompts"]
        conc, variations, scenes = plan["concurrency"], plan["variations"], plan["scenes"]
        asyncio.run(clients(scoring, data, texts, conc, variations, 1))  # warm-up: first passes allocate
        before = {name: h.recent_batch_sizes.remote().result() for name, h in handles.items()}
        model_before = handles["scoring"].model_batch_sizes.remote().result() if layout == "colocated" else {}
        sampler = DeviceSampler(plan["device"]).start()
        t = time.perf_counter()
        images = asyncio.run(clients(scoring, data, texts, conc, variations, scenes))
        wall = time.perf_counter() - t
        result["gpu"] = sampler.stop()
        after = {name: h.recent_batch_sizes.remote().result() for name, h in handles.items()}
        new = {name: after[name][len(before[name]):] for name in handles}
        if layout == "colocated":
            model_after = handles["scoring"].model_batch_sizes.remote().result()
            result["batches"] = {n: sizes(model_after[n][len(model_before.get(n, [])):]) for n in SCORERS}
            result["request_batches"] = sizes(new["scoring"])
        else:
            result["batches"] = {n: sizes(new[n]) for n in SCORERS}
        result.update(images=images, wall_s=wall, variations_per_s=images / wall, concurrency=conc,
                      variations=variations, scenes_per_client=scenes)
        stats = {dep: handles[name].device_stats.remote().result() for name, dep in deployments.items()}
        result["memory"] = memory_report(stats, result["gpu"])
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return result


def memory_report(stats: dict[str, dict], gpu: dict) -> dict:
    """Each replica's peak and reserved memory, and the device's most used memory, or why not."""
    on_cpu = all(s.get("max_memory_allocated") in (None, 0) and not str(s.get("device", "")).startswith("cuda")
                 for s in stats.values())
    if on_cpu:
        return {"available": False, "reason": UNAVAILABLE_CPU, "replicas": stats}
    return {"available": True, "replicas": stats, "device_used_max_bytes": gpu.get("memory_used_max_bytes")}


# ---------------------------------------------------------------- orchestration


def run_phase(plan_file: Path, phase: list[str], out: Path, timeout_s: float) -> dict:
    """One phase in a fresh process (its own session: whatever Ray leaves behind is ended with it)."""
    argv = [sys.executable, __file__, "--plan", str(plan_file), "--phase", *phase, "--phase-out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(argv, start_new_session=True)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:  # also when we are interrupted: the phase runs in a session of its own and would outlive us
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    seconds = time.perf_counter() - started
    print(f"   phase {' '.join(phase)}: {seconds:.0f} s", flush=True)
    if code == 0 and out.is_file():
        return {**json.loads(out.read_text()), "phase_s": seconds}
    return {"error": f"phase {' '.join(phase)} " + ("timed out" if code is None else f"exited with {code}"), "phase_s": seconds}


def build_models(args) -> tuple[dict, dict]:
    from scorers.tiny import COMPLETE, build_tiny_models

    storage = None if args.shapes != "real" else ("bf16" if "bf16" in args.dtypes else "fp16")
    root = (args.models_dir / f"{args.shapes}-{storage or 'fp32'}").resolve()
    cached = all((root / name / COMPLETE).exists() for name in (*SCORERS, "consistency"))
    started = time.perf_counter()
    models = build_tiny_models(root, shapes=args.shapes, dtype=storage)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"models ({args.shapes}, stored {storage or 'fp32'}) {'cached' if cached else 'built'} in {seconds:.1f} s, "
          f"{size / 1e9:.2f} GB under {root}", flush=True)
    return models, {"shapes": args.shapes, "stored_dtype": storage or "fp32", "cached": cached, "seconds": seconds,
                    "bytes": size, "root": str(root)}


def make_plan(args, models: dict) -> dict:
    work = args.work_dir.resolve()
    (work / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(args.distinct):
        size = SIZES[i % len(SIZES)]
        path = work / "images" / f"photo_{i}_{size[0]}x{size[1]}.png"
        if not path.is_file():
            path.write_bytes(photo_png(i, size))
        files.append(str(path))
    texts, source = prompts(max(64, args.images))
    production = serve_config_scorers()
    batches = {name: production.get(name, {}).get("batch", {}).get("max_batch_size", 16) for name in (*SCORERS, "consistency")}
    for item in args.batch:
        name, _, size = item.partition("=")
        if name not in batches or not size.isdigit():
            raise SystemExit(f"--batch {item!r}: use SCORER=N with SCORER one of {', '.join(batches)}")
        batches[name] = int(size)
    return {"device": args.device, "models": models, "image_files": files, "prompts": texts, "prompt_source": source,
            "limit_images": args.images, "batches": batches, "serving": production, "concurrency": args.concurrency,
            "variations": args.variations, "scenes": args.scenes, "work_dir": str(work),
            "startup_timeout_s": args.startup_timeout, "colocated_cpus": args.colocated_cpus,
            "limit_threads": args.limit_threads, "repeats": args.repeats}


def input_paths_available() -> list[str]:
    from pipeline.settings import ScoringSettings

    return ["pil", "tensor"] if "input_path" in ScoringSettings.model_fields else ["pil"]


def orchestrate(args) -> dict:
    started = time.perf_counter()
    models, build = build_models(args)
    plan = make_plan(args, models)
    work = Path(plan["work_dir"])
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    image_bytes = [Path(f).stat().st_size for f in plan["image_files"]]
    report = {"command": " ".join(sys.argv), "machine": machine(args.device), "build": build,
              "config": {k: plan[k] for k in ("device", "limit_images", "batches", "concurrency", "variations", "scenes",
                                              "prompt_source")} | {"shapes": args.shapes, "dtypes": args.dtypes,
                                                                  "layouts": args.layouts, "input_paths": args.input_paths,
                                                                  "image_bytes": image_bytes, "image_sizes": [list(s) for s in SIZES]},
              "runs": []}
    try:
        measure(args, plan_file, work, report)
    except KeyboardInterrupt:  # a time limit (timeout --signal=INT): keep and print what was measured
        report["interrupted"] = True
        print("\ninterrupted: the report holds the phases that finished", flush=True)
    report["seconds"] = time.perf_counter() - started
    save(args.json, report)
    return report


def measure(args, plan_file: Path, work: Path, report: dict) -> None:
    for dtype in args.dtypes:
        for path in args.input_paths:
            run = {"dtype": dtype, "input_path": path, "served": {}}
            report["runs"].append(run)
            print(f"\n== {dtype}, input path {path}: limit", flush=True)
            run["limit"] = run_phase(plan_file, ["limit", dtype, path], work / f"limit-{dtype}-{path}.json", args.phase_timeout)
            save(args.json, report)
            for layout in args.layouts:
                print(f"== {dtype}, input path {path}: served, layout {layout}", flush=True)
                served = run_phase(plan_file, ["served", dtype, path, layout], work / f"served-{dtype}-{layout}-{path}.json",
                                   args.phase_timeout)
                limit = run["limit"].get("images_per_s")
                if "variations_per_s" in served and limit:
                    served["served_over_limit"] = served["variations_per_s"] / limit
                run["served"][layout] = served
                save(args.json, report)


def save(path: Path | None, report: dict) -> None:
    """Written after every phase, so a run stopped by a time limit keeps what it measured."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def machine(device: str) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def gib(value) -> str:
    return f"{value / 2**30:.1f} GiB" if isinstance(value, (int, float)) else "n/a"


def print_report(report: dict) -> None:
    b = report["build"]
    print(f"\nMachine: {report['machine']}; models {b['shapes']} stored {b['stored_dtype']} "
          f"({'cached' if b['cached'] else 'built'} in {b['seconds']:.0f} s, {b['bytes'] / 1e9:.2f} GB)")
    print("\n| dtype | input | layout | variations/s | limit img/s | served / limit | bare img/s | batches mean/max "
          "(pick, clip, vqa, aes) | GPU util mean/max | device memory max | replicas' peak allocated |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        limit = run.get("limit", {"error": "not measured"})
        for layout, s in run["served"].items():
            if "error" in s or "error" in limit:
                print(f"| {run['dtype']} | {run['input_path']} | {layout} | {s.get('error') or limit.get('error')} |")
                continue
            batches = ", ".join(f"{s['batches'][n]['mean']:.1f}/{s['batches'][n]['max']}" for n in SCORERS)
            gpu = s["gpu"]
            util = f"{gpu['utilization_mean_pct']:.0f}/{gpu['utilization_max_pct']:.0f} %" if gpu["available"] else "n/a (CPU)"
            memory = s["memory"]
            peaks = ("; ".join(f"{d} {gib(r.get('max_memory_allocated'))}" for d, r in memory["replicas"].items())
                     if memory["available"] else "n/a (CPU)")
            device_max = gib(gpu.get("memory_used_max_bytes")) if gpu["available"] else "n/a (CPU)"
            bare = f"{limit['bare_images_per_s']:.2f}" if limit.get("bare_images_per_s") else "n/a"
            print(f"| {run['dtype']} | {run['input_path']} | {layout} | {s['variations_per_s']:.2f} | "
                  f"{limit['images_per_s']:.2f} | {s['served_over_limit']:.2f} | {bare} | {batches} | {util} | "
                  f"{device_max} | {peaks} |")
    print("\nPer scorer in the limit phase (images/s through score(), bare forward):")
    for run in report["runs"]:
        rows = run.get("limit", {}).get("scorers", {})
        print(f"  {run['dtype']}/{run['input_path']}: decode {run.get('limit', {}).get('decode_ms_per_image', 0):.1f} ms/image; " +
              ", ".join(f"{n} b{r['batch']} {r['images_per_s']:.1f}/{(r.get('bare_images_per_s') or 0):.1f}"
                        for n, r in rows.items()))


def interrupted(*_) -> None:
    """SIGTERM (a time limit) ends the run like Ctrl-C: the running phase is ended, the report kept."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny shapes, few images: checks the whole path")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=["separate", "colocated"], default=["separate", "colocated"])
    parser.add_argument("--input-paths", nargs="+", choices=["pil", "tensor"], default=["pil"])
    parser.add_argument("--shapes", default="real", help="scorers/shapes/<name>.json: real, bench or tiny")
    parser.add_argument("--images", type=int, default=64, help="images per scorer in the limit phase")
    parser.add_argument("--distinct", type=int, default=8, help="distinct PNGs (reused round-robin)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients in the served phase")
    parser.add_argument("--variations", type=int, default=4, help="images per scene (scored at once)")
    parser.add_argument("--scenes", type=int, default=6, help="scenes per client in the served phase")
    parser.add_argument("--batch", nargs="*", default=[], metavar="SCORER=N",
                        help="override serve_config.yaml's batch size of a scorer")
    parser.add_argument("--colocated-cpus", type=int, default=4, help="CPUs and torch threads of the Scoring replica on a GPU")
    parser.add_argument("--repeats", type=int, default=2, help="limit phase: best of this many timed runs")
    parser.add_argument("--limit-threads", type=int, default=0, help="torch threads in the limit phase (default torch's)")
    parser.add_argument("--phase-timeout", type=float, default=600)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "output/gpu-bench-models")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "output/gpu-bench")
    parser.add_argument("--json", type=Path, help="write everything here (after every phase)")
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # a child: one phase, its result to --phase-out
        plan = json.loads(args.plan.read_text())
        kind, dtype, path, *rest = args.phase
        result = phase_limit(plan, dtype, path) if kind == "limit" else phase_served(plan, dtype, rest[0], path)
        args.phase_out.write_text(json.dumps(result))
        return 0
    if args.smoke:
        for key, value in SMOKE.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    missing = set(args.input_paths) - set(input_paths_available())
    if missing:
        parser.error(f"input path(s) {', '.join(sorted(missing))} need ScoringSettings.input_path (not in this checkout)")
    signal.signal(signal.SIGTERM, interrupted)
    report = orchestrate(args)
    print_report(report)
    failed = [f"{r['dtype']}/{r['input_path']}" for r in report["runs"]
              if "error" in r.get("limit", {"error": 1}) or any("error" in s for s in r["served"].values())]
    print(f"\nbenchmark time {report['seconds']:.0f} s" + (f"; FAILED phases in {', '.join(failed)}" if failed else ""))
    return 1 if failed or report.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
