"""Prometheus metrics through Ray Serve's metrics API, fed by the pipeline's telemetry hooks.

`install()` makes a `ServeMetrics` the process's telemetry sink; each deployment calls it in
its constructor, so the pipeline code running in that replica (the runner in the ingress, the
retry loop in the provider deployments, the forward passes in the scorers) reports here
without importing Ray. Ray's metrics agent on every node exports them on its metrics export
port, prefixed `ray_` and tagged by Serve with `deployment`, `replica` and `application`
(docs/operations.md says how to scrape them; cluster/grafana/sceneref.json shows them).

Names follow Prometheus' conventions: counters end in `_total`, durations are `_seconds`.
Labels are bounded sets (stage, status, provider kind, error kind, scorer, model id): never a
user id, a prompt or a generation id.
"""

from __future__ import annotations

import asyncio
import logging

from ray.serve.metrics import Counter, Histogram

from pipeline.jobs.store import FINISHED
from pipeline.telemetry import Telemetry, current_sink, hooks, set_sink

STAGE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600]
FORWARD_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
ITERATION_BUCKETS = [1, 2, 3, 4, 5, 6]
SCORE_BUCKETS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]

# name -> (type, description, label keys, buckets): the one list the dashboard test reads.
METRICS: dict[str, tuple[str, str, tuple[str, ...], list | None]] = {
    "sceneref_generations_total": ("counter", "Generation runs ended, by final status", ("status",), None),
    "sceneref_stage_duration_seconds": (
        "histogram", "Time per stage: planning per generation; enhancement, generation, scoring per scene", ("stage",), STAGE_BUCKETS,
    ),
    "sceneref_enhancement_iterations": ("histogram", "Agent iterations a scene's prompt took", (), ITERATION_BUCKETS),
    "sceneref_provider_calls_total": (
        "counter", "Provider calls ended (after retries), by kind and outcome (ok/error) and error reason", ("kind", "outcome", "reason"), None,
    ),
    "sceneref_provider_retries_total": ("counter", "Provider call attempts that failed and were retried", ("kind", "reason"), None),
    "sceneref_scorer_batch_size": ("histogram", "Inputs per scorer forward pass", ("scorer",), BATCH_BUCKETS),
    "sceneref_scorer_forward_seconds": ("histogram", "Time of one scorer forward pass (decode included)", ("scorer",), FORWARD_BUCKETS),
    "sceneref_selected_quality_score": ("histogram", "Overall quality score (0-100) of each scene's selected image", (), SCORE_BUCKETS),
    "sceneref_images_generated_total": ("counter", "Images received from the image provider", ("provider",), None),
    "sceneref_llm_tokens_total": ("counter", "LLM and image-model tokens accounted, by model and direction", ("model", "direction"), None),
    "sceneref_cost_usd_total": ("counter", "Estimated spend at list prices, by stage (priced calls only)", ("stage",), None),
    "sceneref_unpriced_scenes_total": ("counter", "Scene stages with a call whose model has no price", ("stage",), None),
}

log = logging.getLogger("sceneref.metrics")

# As exported by Ray's metrics agent (namespace `ray_`).
EXPORT_PREFIX = "ray_"


def _make(name: str):
    kind, description, tags, buckets = METRICS[name]
    if kind == "counter":
        return Counter(name, description=description, tag_keys=tags)
    return Histogram(name, description=description, boundaries=buckets, tag_keys=tags)


class ServeMetrics(Telemetry):
    """The telemetry sink of a Serve replica: every hook records into a Serve metric."""

    def __init__(self) -> None:
        self.metric = {name: _make(name) for name in METRICS}

    def _inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self.metric[name].inc(value, tags=tags or None)

    def _observe(self, name: str, value: float, **tags: str) -> None:
        self.metric[name].observe(value, tags=tags or None)

    def generation_finished(self, status: str) -> None:
        self._inc("sceneref_generations_total", status=status)

    def stage_seconds(self, stage: str, seconds: float) -> None:
        self._observe("sceneref_stage_duration_seconds", seconds, stage=stage)

    def enhancement_iterations(self, count: int) -> None:
        self._observe("sceneref_enhancement_iterations", count)

    def provider_call(self, kind: str, outcome: str, reason: str = "") -> None:
        self._inc("sceneref_provider_calls_total", kind=kind, outcome=outcome, reason=reason or "none")

    def provider_retry(self, kind: str, reason: str) -> None:
        self._inc("sceneref_provider_retries_total", kind=kind, reason=reason)

    def scorer_batch(self, scorer: str, size: int, seconds: float) -> None:
        self._observe("sceneref_scorer_batch_size", size, scorer=scorer)
        self._observe("sceneref_scorer_forward_seconds", seconds, scorer=scorer)

    def selected_quality(self, score: float) -> None:
        self._observe("sceneref_selected_quality_score", score)

    def images_generated(self, provider: str, count: int) -> None:
        if count:
            self._inc("sceneref_images_generated_total", count, provider=provider)

    def usage(self, kind: str, model: str, input_tokens: int, output_tokens: int) -> None:
        if input_tokens:
            self._inc("sceneref_llm_tokens_total", input_tokens, model=model, direction="input")
        if output_tokens:
            self._inc("sceneref_llm_tokens_total", output_tokens, model=model, direction="output")

    def cost(self, stage: str, usd: float | None) -> None:
        if usd is None:
            self._inc("sceneref_unpriced_scenes_total", stage=stage)
        elif usd > 0:
            self._inc("sceneref_cost_usd_total", usd, stage=stage)


def install() -> Telemetry:
    """Make Serve metrics this process's telemetry sink (once: replicas of several
    deployments may share a worker process only in local testing mode)."""
    sink = current_sink()
    if not isinstance(sink, ServeMetrics):
        sink = ServeMetrics()
        set_sink(sink)
    return sink


async def record_final_status(store, generation_id: str) -> None:
    """Count a generation run that ended on this replica by the status the job store holds
    (the runner's outcome alone cannot tell a cancel from a lease given up on shutdown). A
    run that left the job unfinished (lease lost or released) counts nothing: whoever ends
    it counts it."""
    try:
        record = await asyncio.to_thread(store.get, generation_id)
    except Exception as exc:  # the store is away: the run's own log says how it ended
        log.warning("generation %s: final status not counted, the job store could not be read (%s)",
                    generation_id, type(exc).__name__)
        return
    if record is not None and record.status in FINISHED:
        hooks().generation_finished(record.status)
