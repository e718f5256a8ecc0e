"""Pipeline benchmark: does the runner's wall time follow its critical path?

Runs one generation (default: target_duration 15 -> 4 scenes, 4 variations, up to 4
enhancement iterations) through the real `openai` clients against the local
FakeOpenAIServer with injected latencies (default 1 s per LLM call, 5 s per image call) and
PixelScoring with a scoring latency (default 0.5 s per call). Then, from what actually happened
(the server's recorded requests, the scorer's recorded calls), it computes:

- critical path = planning (storyboard calls x LLM latency)
                + the slowest scene's enhancement loop (its LLM calls x LLM latency)
                + per generated scene: one image latency + its scoring calls x scoring latency
  (scenes are enhanced concurrently, variations are generated concurrently, scenes are
  chained one after another), and
- sequential = every call's latency summed, as if each were awaited after the previous one.

and prints wall / critical (target: within 1.10x) and sequential / wall (the speed-up).

    .venv/bin/python benchmarks/pipeline.py                       # defaults
    .venv/bin/python benchmarks/pipeline.py --chat-latency 0.2 --image-latency 1 --scoring-latency 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.agents import CINEMATOGRAPHER, PROMPT_ENGINEER  # noqa: E402
from pipeline.storage.objectstore import LocalObjectStore  # noqa: E402
from pipeline.jobs.store import JobStore  # noqa: E402
from pipeline.providers.openai_clients import OpenAIChat, OpenAIImages  # noqa: E402
from pipeline.runner import ProgressEvent, Services, run_generation  # noqa: E402
from pipeline.schemas import GenerationRequest  # noqa: E402
from pipeline.jobs.run import execute_job  # noqa: E402
from pipeline.settings import ImageSettings, LLMSettings, PipelineSettings, RetrySettings, TraceSettings  # noqa: E402
from pipeline.storyboard import SYSTEM as STORYBOARD_SYSTEM  # noqa: E402
from testkit.doubles import FakeOpenAIServer, PixelScoring  # noqa: E402

KEY_ENV = "SCENEREF_BENCH_OPENAI_KEY"
PROMPT = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat-latency", type=float, default=1.0, help="seconds per LLM call (default 1)")
    parser.add_argument("--image-latency", type=float, default=5.0, help="seconds per image call (default 5)")
    parser.add_argument("--scoring-latency", type=float, default=0.5, help="seconds per scoring call (default 0.5)")
    parser.add_argument("--duration", type=int, default=15, help="target_duration in seconds (default 15 -> 4 scenes)")
    parser.add_argument("--variations", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4, help="max enhancement iterations")
    parser.add_argument("--size", default="512x288", help="image size the fake server renders")
    parser.add_argument(
        "--job", action="store_true",
        help="run through execute_job with a SQLite JobStore (checkpoints and progress writes included)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


class TimedChat:
    """Records each chat call's client-side round trip (start, end) and its inputs."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[float, float, dict]] = []

    async def complete(self, messages, *, task):
        started = time.perf_counter()
        try:
            return await self.inner.complete(messages, task=task)
        finally:
            self.calls.append((started, time.perf_counter(), {"task": task, **json.loads(messages[1]["content"])}))


class TimedImages:
    """Records each image call's client-side round trip (start, end, prompt)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[float, float, str]] = []

    async def generate(self, prompt, *, reference, variation):
        started = time.perf_counter()
        try:
            return await self.inner.generate(prompt, reference=reference, variation=variation)
        finally:
            self.calls.append((started, time.perf_counter(), prompt))


def chat_task(record) -> str:
    system = record.json["messages"][0]["content"]
    return {STORYBOARD_SYSTEM: "storyboard", CINEMATOGRAPHER: "cinematographer", PROMPT_ENGINEER: "prompt_engineer"}[system]


async def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault(KEY_ENV, "bench-key")
    no_retry = RetrySettings(max_attempts=1)  # no faults are injected; a retry would skew the figures
    with FakeOpenAIServer(chat_latency_s=args.chat_latency, image_latency_s=args.image_latency) as server, \
            tempfile.TemporaryDirectory(prefix="sceneref-bench-") as tmp:
        settings = PipelineSettings(
            llm=LLMSettings(base_url=server.base_url, api_key_env=KEY_ENV, model="bench-chat", retry=no_retry),
            images=ImageSettings(base_url=server.base_url, api_key_env=KEY_ENV, size=args.size, retry=no_retry),
            traces=TraceSettings(root=Path(tmp) / "traces", keep=False),
            artifacts_dir=Path(tmp) / "artifacts",
        )
        scoring = PixelScoring(latency_s=args.scoring_latency)
        chat, images = TimedChat(OpenAIChat(settings.llm)), TimedImages(OpenAIImages(settings.images))
        services = Services(
            chat=chat,
            images=images,
            scoring=scoring,
            artifacts=LocalObjectStore(settings.artifacts_dir),
        )
        request = GenerationRequest(
            prompt=PROMPT,
            target_duration=args.duration,
            advanced_image_num_variations=args.variations,
            advanced_image_max_enhancement_iterations=args.iterations,
        )
        marks: dict[str, float] = {}

        def on_event(event: ProgressEvent) -> None:
            marks.setdefault(f"{event.stage}:{event.scene}", time.perf_counter())

        generation_id = uuid.uuid4().hex
        store = None
        if args.job:
            store = JobStore(f"sqlite:///{tmp}/bench.sqlite")
            store.create(generation_id, "bench", request.model_dump(mode="json"), offline=False)
        started = time.perf_counter()
        if store is None:
            scenes = await run_generation(generation_id, request, services, settings, on_event=on_event)
        else:
            lease = store.claim("bench", 60, generation_id=generation_id)
            scenes = await execute_job(store, lease, services, settings, lease_s=60, on_event=on_event)
            if scenes is None:
                raise SystemExit(f"generation failed: {store.get(generation_id).error}")
        wall = time.perf_counter() - started
        if store is not None:
            store.close()

        requests = server.requests
    # --- what happened ---
    scene_of_prompt = {scene.original_prompt: scene.scene_number for scene in scenes}
    storyboard_calls = 0
    enhancement_calls: Counter[int] = Counter()
    for record in (r for r in requests if r.endpoint == "chat"):
        if chat_task(record) == "storyboard":
            storyboard_calls += 1
        else:
            payload = json.loads(record.json["messages"][1]["content"])
            enhancement_calls[scene_of_prompt[payload["scene_prompt"]]] += 1
    image_calls = sum(r.endpoint in ("generations", "edits") for r in requests)
    generated = [s for s in scenes if not s.user_provided]
    scoring_calls = len(scoring.calls)
    scoring_calls_per_scene = scoring_calls / max(len(generated), 1)

    planning = storyboard_calls * args.chat_latency
    slowest_enhancement = max(enhancement_calls.values(), default=0) * args.chat_latency
    per_scene = args.image_latency + scoring_calls_per_scene * args.scoring_latency
    critical = planning + slowest_enhancement + len(generated) * per_scene
    sequential = (
        (storyboard_calls + sum(enhancement_calls.values())) * args.chat_latency
        + image_calls * args.image_latency
        + scoring_calls * args.scoring_latency
    )
    # The same path with each call's measured round trip instead of its injected latency: what
    # is left between it and the wall time is the runner's own overhead (gaps between calls).
    measured_planning = sum(end - start for start, end, inputs in chat.calls if inputs["task"] == "storyboard")
    measured_enhancement: Counter[int] = Counter()
    for start, end, inputs in chat.calls:
        if inputs["task"] != "storyboard":
            measured_enhancement[scene_of_prompt[inputs["scene_prompt"]]] += end - start
    scene_of_final = {scene.enhanced_prompt: scene.scene_number for scene in generated}
    slowest_variation: dict[int, float] = {}
    for start, end, prompt in images.calls:
        n = scene_of_final[prompt]
        slowest_variation[n] = max(slowest_variation.get(n, 0.0), end - start)
    measured_scoring = sum(c.finished - c.started for c in scoring.calls)
    measured_critical = (
        measured_planning
        + max(measured_enhancement.values(), default=0.0)
        + sum(slowest_variation.values())
        + measured_scoring
    )
    enhanced_at = max((v for k, v in marks.items() if k.startswith("enhancing:")), default=started)
    return {
        "path": "execute_job + JobStore(sqlite)" if args.job else "run_generation",
        "size": args.size,
        "scenes": len(scenes),
        "variations": args.variations,
        "max_iterations": args.iterations,
        "latency_s": {"chat": args.chat_latency, "image": args.image_latency, "scoring": args.scoring_latency},
        "calls": {
            "storyboard": storyboard_calls,
            "enhancement_per_scene": dict(sorted(enhancement_calls.items())),
            "image": image_calls,
            "scoring": scoring_calls,
            "scoring_batch_sizes": scoring.batch_sizes,
        },
        "chat_max_in_flight": server.max_in_flight["chat"],
        "image_max_in_flight": max(server.max_in_flight["generations"], server.max_in_flight["edits"]),
        "wall_s": round(wall, 3),
        "enhancement_done_at_s": round(enhanced_at - started, 3),
        "planning_plus_enhancement_expected_s": round(planning + slowest_enhancement, 3),
        "critical_path_s": round(critical, 3),
        "sequential_s": round(sequential, 3),
        "wall_over_critical": round(wall / critical, 4) if critical else None,
        "sequential_over_wall": round(sequential / wall, 2),
        "measured_critical_path_s": round(measured_critical, 3),
        "wall_over_measured_critical": round(wall / measured_critical, 4) if measured_critical else None,
        "measured_call_overhead_s": round(measured_critical - critical, 3),
        "runner_overhead_s": round(wall - measured_critical, 3),
    }


def report(figures: dict) -> str:
    calls = figures["calls"]
    lines = [
        f"{figures['path']}, images {figures['size']}, "
        f"scenes {figures['scenes']}, variations {figures['variations']}, max iterations {figures['max_iterations']}; "
        f"latencies: chat {figures['latency_s']['chat']} s, image {figures['latency_s']['image']} s, "
        f"scoring {figures['latency_s']['scoring']} s",
        f"calls: storyboard {calls['storyboard']}, enhancement per scene {calls['enhancement_per_scene']}, "
        f"image {calls['image']}, scoring {calls['scoring']} (batches {calls['scoring_batch_sizes']})",
        f"peak in flight: chat {figures['chat_max_in_flight']}, images {figures['image_max_in_flight']}",
        f"enhancement finished at {figures['enhancement_done_at_s']:.2f} s "
        f"(planning + slowest loop: {figures['planning_plus_enhancement_expected_s']:.2f} s)",
        f"wall time          {figures['wall_s']:8.2f} s",
        f"critical path      {figures['critical_path_s']:8.2f} s",
        f"sequential         {figures['sequential_s']:8.2f} s",
        f"wall / critical    {figures['wall_over_critical']:8.3f}x  (target <= 1.10x: "
        f"{'met' if figures['wall_over_critical'] <= 1.10 else 'MISSED'})",
        f"sequential / wall  {figures['sequential_over_wall']:8.2f}x",
        f"critical path with measured call times {figures['measured_critical_path_s']:.2f} s "
        f"(calls took {figures['measured_call_overhead_s']:+.2f} s beyond their injected latency: "
        f"HTTP, fake-server rendering, scoring pixel math, all in this process)",
        f"wall / measured critical {figures['wall_over_measured_critical']:.3f}x "
        f"(runner's own overhead between calls: {figures['runner_overhead_s']:.2f} s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = asyncio.run(run(args))
    print(report(figures))
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0 if figures["wall_over_critical"] <= 1.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
