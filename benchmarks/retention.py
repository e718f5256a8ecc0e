"""Retention benchmark: does the store's size stay bounded while generations keep coming?

Runs many offline generations back to back in this process, the way an ingress replica runs
them (`pipeline.jobs.run.execute_job` on a claimed lease, the offline providers, the tiny
scorer models through the real loading code), with retention on: a loop that calls
`pipeline.jobs.retention.sweep` every `--interval-s`, as the job worker's `JobWorker._retention_loop` does, with short
`--traces-s` / `--generations-s`. Every `--sample-s` it samples the artifact and trace stores
(bytes, each hard-linked byte once, and object count) and the job store (rows), and keeps
sampling after the last generation until the store has drained.

What it should show: the size rises for about `generations_s` and then stays on a plateau
near `rate x (generations_s x artifact bytes per generation + traces_s x trace bytes per
generation)`, instead of growing with the number of generations; after the last one it falls
to nothing. It prints the samples, the plateau and that estimate.

    .venv/bin/python benchmarks/retention.py                       # 120 generations, ~3 min on 2 cores
    .venv/bin/python benchmarks/retention.py --generations 300 --json out.json

Local directories and SQLite (one machine); the sweep is the same code on S3 and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import local_consistency, local_scoring  # noqa: E402
from pipeline.providers.factory import build_providers  # noqa: E402
from pipeline.jobs.store import JobStore  # noqa: E402
from pipeline.storage.factory import open_store  # noqa: E402
from pipeline.storage.objectstore import stored_bytes  # noqa: E402
from pipeline.jobs.retention import RetentionSettings, sweep  # noqa: E402
from pipeline.runner import Services  # noqa: E402
from pipeline.schemas import GenerationRequest  # noqa: E402
from pipeline.jobs.run import execute_job  # noqa: E402
from pipeline.settings import PipelineSettings, TraceSettings  # noqa: E402

REQUEST = GenerationRequest(prompt="A launch video for Aurora, a smart desk lamp that adapts to you", target_duration=9,
                            advanced_image_num_variations=2, advanced_image_max_enhancement_iterations=1)
LEASE_S = 30.0


def rows(store: JobStore) -> int:
    later = datetime.now(timezone.utc) + timedelta(days=1)
    return store.count_unfinished() + len(store.expired(finished_before=later, limit=10**9))


class Run:
    def __init__(self, options: argparse.Namespace, work: Path):
        self.options = options
        self.settings = PipelineSettings.offline(work).model_copy(update={
            "artifacts_dir": str(work / "artifacts"),
            "traces": TraceSettings(root=str(work / "traces"), keep=True),  # traces wait for retention
        })
        self.retention = RetentionSettings(traces_s=options.traces_s, generations_s=options.generations_s,
                                           interval_s=options.interval_s)
        self.store = JobStore(f"sqlite:///{work / 'jobs.db'}")
        self.artifacts = open_store(self.settings.artifacts_dir)
        self.traces = open_store(self.settings.traces.root)
        chat, images = build_providers(self.settings)
        self.services = Services(chat=chat, images=images, scoring=local_scoring(self.settings, offline=True),
                                 consistency=local_consistency(self.settings, offline=True),
                                 artifacts=self.artifacts, traces=self.traces)
        self.samples: list[dict] = []
        self.finished: list[dict] = []  # per generation: when, and what it stored at that moment
        self.removed = 0
        self.sweep_failures: list[str] = []
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        keys = self.artifacts.list("") + self.traces.list("")
        point = {
            "t": round(time.monotonic() - self.t0, 1), "finished": len(self.finished), "rows": rows(self.store),
            "objects": len(keys), "bytes": stored_bytes(self.artifacts, self.traces), "removed": self.removed,
        }
        self.samples.append(point)
        return point

    async def one(self, n: int) -> None:
        gid = f"ret-{n:04d}-{uuid.uuid4().hex[:6]}"
        self.store.create(gid, "bench", REQUEST.model_dump(mode="json"), offline=True)
        lease = self.store.claim("bench", LEASE_S, generation_id=gid)
        await execute_job(self.store, lease, self.services, self.settings, lease_s=LEASE_S)
        status = self.store.get(gid).status
        if status != "completed":
            raise RuntimeError(f"generation {gid} ended {status}: {self.store.get(gid).error}")
        art = stored_bytes(self.artifacts, prefix=gid)
        # Trace images are hard links to the artifacts: count only what the traces add.
        extra = stored_bytes(self.artifacts, self.traces, prefix=gid) - art
        self.finished.append({"t": time.monotonic() - self.t0, "artifacts": art, "traces": extra})

    async def generations(self) -> None:
        slots = asyncio.Semaphore(self.options.concurrency)

        async def guarded(n: int) -> None:
            async with slots:
                await self.one(n)

        await asyncio.gather(*(guarded(n) for n in range(self.options.generations)))

    async def retention_loop(self) -> None:
        """What JobWorker._retention_loop does, without the start-up jitter: a failed sweep is
        reported and tried again at the next interval."""
        while True:
            try:
                self.removed += len(await asyncio.to_thread(sweep, self.store, self.artifacts, self.traces, self.retention))
            except Exception as exc:
                self.sweep_failures.append(f"t={time.monotonic() - self.t0:.1f}s {type(exc).__name__}: {exc}")
                print(f"retention sweep failed: {self.sweep_failures[-1]}", file=sys.stderr, flush=True)
            await asyncio.sleep(self.retention.interval_s)

    async def sampler(self) -> None:
        while True:
            point = await asyncio.to_thread(self.sample)
            print(f"t={point['t']:6.1f}s finished {point['finished']:3d} rows {point['rows']:3d} "
                  f"objects {point['objects']:5d} stored {point['bytes'] / 1e6:7.2f} MB", file=sys.stderr, flush=True)
            await asyncio.sleep(self.options.sample_s)

    async def main(self) -> dict:
        loops = [asyncio.ensure_future(self.retention_loop()), asyncio.ensure_future(self.sampler())]
        await self.generations()
        last = time.monotonic() - self.t0
        # Drain: past the retention period of the last generation, plus two sweeps.
        deadline = time.monotonic() + self.retention.generations_s + 3 * self.retention.interval_s + 5
        while time.monotonic() < deadline and rows(self.store):
            await asyncio.sleep(0.5)
        for loop in loops:
            if loop.done():  # a loop that died would leave the figures silently short
                loop.result()
            loop.cancel()
        self.sample()
        return self.report(last)

    def report(self, last_finish_s: float) -> dict:
        first_finish_s = self.finished[0]["t"]
        rate = (len(self.finished) - 1) / (last_finish_s - first_finish_s)  # generations per second
        art = statistics.mean(f["artifacts"] for f in self.finished)
        tra = statistics.mean(f["traces"] for f in self.finished)
        # Steady state: from one generations_s after the first finished to the last finish.
        steady = [s for s in self.samples if first_finish_s + self.retention.generations_s <= s["t"] <= last_finish_s]
        estimate = rate * (self.retention.generations_s * art + self.retention.traces_s * tra)
        figures = {
            "generations": len(self.finished), "concurrency": self.options.concurrency,
            "traces_s": self.retention.traces_s, "generations_s": self.retention.generations_s,
            "interval_s": self.retention.interval_s, "rate_per_s": rate,
            "artifact_bytes_per_generation": art, "trace_bytes_per_generation": tra,
            "stored_if_kept": sum(f["artifacts"] + f["traces"] for f in self.finished),
            "peak_bytes": max(s["bytes"] for s in self.samples), "peak_objects": max(s["objects"] for s in self.samples),
            "peak_rows": max(s["rows"] for s in self.samples),
            "plateau_bytes_mean": statistics.mean(s["bytes"] for s in steady) if steady else None,
            "plateau_samples": len(steady), "estimate_bytes": estimate,
            "after_drain": self.samples[-1], "removed": self.removed, "sweep_failures": self.sweep_failures,
            "samples": self.samples,
        }
        return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=2, help="generations running at once")
    parser.add_argument("--traces-s", type=float, default=10.0)
    parser.add_argument("--generations-s", type=float, default=30.0)
    parser.add_argument("--interval-s", type=float, default=2.0, help="how often the retention loop sweeps")
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, help="stores go here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the figures and samples here")
    options = parser.parse_args()
    work = (options.workdir or Path(tempfile.mkdtemp(prefix="sceneref-retention-"))).resolve()
    run = Run(options, work)
    figures = asyncio.run(run.main())
    mb = 1e6
    print(f"{figures['generations']} generations at {figures['rate_per_s'] * 60:.1f}/min (concurrency "
          f"{figures['concurrency']}); retention: traces {figures['traces_s']:.0f} s, generations "
          f"{figures['generations_s']:.0f} s, sweep every {figures['interval_s']:.0f} s")
    print(f"per generation: artifacts {figures['artifact_bytes_per_generation'] / mb:.3f} MB, traces "
          f"{figures['trace_bytes_per_generation'] / mb:.3f} MB (beyond the shared image bytes)")
    print(f"kept without retention: {figures['stored_if_kept'] / mb:.2f} MB")
    plateau = figures["plateau_bytes_mean"]
    print(f"with retention: peak {figures['peak_bytes'] / mb:.2f} MB, {figures['peak_objects']} objects, "
          f"{figures['peak_rows']} rows; plateau (mean of {figures['plateau_samples']} samples) "
          + (f"{plateau / mb:.2f} MB" if plateau is not None else "not reached: run more generations")
          + f"; estimate rate x (G x art + T x traces) {figures['estimate_bytes'] / mb:.2f} MB")
    drained = figures["after_drain"]
    print(f"after the last generation's period: {drained['rows']} rows, {drained['objects']} objects, "
          f"{drained['bytes']} bytes; {figures['removed']} generations removed; "
          f"{len(figures['sweep_failures'])} sweeps failed (retried at the next interval)")
    if options.json:
        options.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
