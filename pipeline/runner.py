"""The one entry point for a generation, shared by the CLI and the Serve ingress.

storyboard -> enhance every scene concurrently -> for each scene in order (chained on the
previous scene's selected image): variations concurrently -> score -> rank -> select ->
checkpoint -> traces. Progress is reported through `on_event`; each scene is handed to
`on_scene` as soon as it is selected, so a crash never loses a finished scene and a rerun with
`completed=` resumes at the next one.

Concurrency is structured: the scenes' enhancements and a scene's variations run as task
groups, so the first error that ends the generation cancels its siblings, and a cancellation
of the caller's task (user cancel, lost lease, shutdown) cancels every child. Once
run_generation has raised, no child of it emits, checkpoints or writes anything. Artifact and
trace writes are blocking I/O (local disk or object storage): they run in worker threads so the
event loop of an ingress running a hundred generations stays free for health and status.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from pipeline.agents import enhance_scene
from pipeline.aio import all_or_nothing, landed
from pipeline.storage.objectstore import ObjectStore
from pipeline.storage.objectstore import ObjectStoreError, ObjectStoreUnavailable
from pipeline.providers.base import ChatModel, ImageProvider, ProviderError
from pipeline.schemas import EnhancementResult, GenerationRequest, ScenePlan, SceneResult, VariationResult
from pipeline.consistency import scene_text
from pipeline.costs import Meter, image_usage, summarize
from pipeline.telemetry import hooks
from pipeline.ranking import (
    ConsistencyClient,
    Reference,
    ScoringClient,
    formula,
    measure_consistency,
    rank,
    selection_overall,
)
from pipeline.settings import PipelineSettings
from pipeline.storyboard import plan_storyboard
from pipeline.structured import structured_output_summary
from pipeline.traces import TraceWriter
from scorers.images import PROVIDER_ANSWER, to_png

log = logging.getLogger("sceneref.runner")

# Progress budget: planning 0-5, enhancement 5-25, scenes share 25-100.
_PLANNED, _ENHANCED = 5, 25
_OUTAGE_BACKOFF_S = (0.25, 5.0)  # between attempts of a store call during an outage: first, longest


@dataclass
class _OutageWait:
    """How long this run's store calls wait through an object-store outage (S3Settings.outage_wait_s).
    Once one call has waited the whole bound in vain, the run is ending: `spent` makes every
    later call (best-effort trace writes on the way out) fail at once instead of waiting again."""

    wait_s: float = 0.0
    spent: bool = False


# Set by run_generation for its own task and the tasks it starts.
_OUTAGE: contextvars.ContextVar[_OutageWait] = contextvars.ContextVar("outage_wait", default=_OutageWait())


class GenerationError(RuntimeError):
    """The generation cannot go on; the message says why (shown as the status's `error`).

    `retryable` says the cause was transient (a provider still failing after its retries, a
    scoring deployment without a live replica): the job owner records it so a user knows that
    resuming the generation is worth it.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def transient(error: BaseException | None) -> bool:
    """An error is transient when it, or an error it was raised from, says `retryable=True`
    (ProviderError does; the Serve scoring adapter's errors do for a replica that went away)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if getattr(error, "retryable", False) is True:
            return True
        seen.add(id(error))
        error = error.__cause__
    return False


@dataclass
class ProgressEvent:
    """What the runner did, for the job's event log, the SSE stream and the CLI's display.

    `stage` is the job's stage (planning | enhancing | generating | scoring | scene_completed |
    completed); `kind` says what happened and defaults to the stage (planning, planned,
    iteration, enhanced, generating, variation, scoring, scored, selected, completed); `data`
    holds that kind's details (an iteration's scores, a variation's outcome, the selection)."""

    stage: str
    progress: int
    message: str
    scene: int | None = None
    total_scenes: int | None = None
    kind: str | None = None
    data: dict = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = self.stage


@dataclass
class Services:
    chat: ChatModel
    images: ImageProvider
    scoring: ScoringClient
    artifacts: ObjectStore
    traces: Any = None  # an object store for the trace tree; None: files under settings.traces.root
    # The image-image consistency model; None: consistency is not measured, and then
    # its selection weight must be 0 (check_services).
    consistency: ConsistencyClient | None = None


def check_services(services: Services, settings: PipelineSettings) -> None:
    """Refuse a consistency weight above 0 without a consistency client: selection would
    silently ignore a weight the config asks for. Raises ValueError."""
    if services.consistency is None and settings.scoring.weights.consistency > 0:
        raise ValueError(
            f"scoring.weights.consistency is {settings.scoring.weights.consistency:g} but no consistency scorer "
            "is configured: give the services a consistency client or set the weight to 0"
        )


Callback = Callable[[Any], Awaitable[None] | None] | None


async def _call(callback: Callback, value: Any) -> None:
    if callback is not None:
        result = callback(value)
        if inspect.isawaitable(result):
            await result


async def _blocking(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run a store call (blocking I/O) in a worker thread, waiting through an object-store outage:
    ObjectStoreUnavailable is retried with backoff for the run's outage bound, so a store that
    comes back within it costs a pause, not the generation. Every call here is idempotent (puts
    of whole objects, reads), so trying it again is safe. The wait is an asyncio sleep: a cancel
    or a lost lease stops it at once."""
    loop = asyncio.get_running_loop()
    outage = _OUTAGE.get()
    deadline = None
    delay, longest = _OUTAGE_BACKOFF_S
    while True:
        try:
            return await landed(function, *args, **kwargs)
        except ObjectStoreUnavailable as exc:
            now = loop.time()
            if deadline is None:
                deadline = now + (0.0 if outage.spent else outage.wait_s)
                if not outage.spent:
                    log.warning("object store outage, waiting up to %.0f s for it: %s", outage.wait_s, exc)
            if now >= deadline:
                outage.spent = True
                raise
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, longest)


def _as_png(data: bytes) -> bytes:
    """Providers may answer PNG, JPEG or WEBP; keep PNG everywhere. Checked and decoded by the
    one image intake (`scorers.images.to_png` with the provider-answer limits: pixel count from
    the header before decoding, no animation); a valid PNG is kept byte for byte. Raises
    ImageError on anything it refuses."""
    return to_png(data, PROVIDER_ANSWER)


def check_attempt(attempt: str) -> str:
    """An attempt id becomes part of object keys: letters, digits, `_` and `-`, at most 64."""
    if not isinstance(attempt, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", attempt):
        raise ValueError(f"invalid attempt id {attempt!r}: letters, digits, '_' and '-', at most 64")
    return attempt


class _StagedTraces:
    """A scene's trace files, held until its checkpoint is accepted: fencing for the trace tree.

    Only the job store checks the lease; an object store cannot. So a run writes a scene's
    trace files under the guide's names only after its fenced checkpoint landed: a run that
    lost its lease (a long pause, a partition from the database) is refused at the checkpoint
    and never writes them, and the run whose checkpoint stands writes files that describe it.
    Images need no holding: their keys carry the attempt, so nobody else's bytes are touched.
    A run that fails keeps what it has of its unfinished scenes under
    `scene_{n}/attempt_{attempt}/` (names no other run writes), so they still explain the
    failure without ever replacing a checkpointed scene's files.
    """

    def __init__(self, writer: TraceWriter, attempt: str):
        self.writer, self.attempt = writer, attempt
        self.pending: dict[int, list[tuple[str, tuple, dict]]] = {}

    def _hold(self, scene_number: int, method: str, *args: Any, **kwargs: Any) -> None:
        self.pending.setdefault(scene_number, []).append((method, (scene_number, *args), kwargs))

    def original_prompt(self, n: int, *args: Any, **kwargs: Any) -> None:
        self._hold(n, "original_prompt", *args, **kwargs)

    def enhancement(self, n: int, *args: Any, **kwargs: Any) -> None:
        self._hold(n, "enhancement", *args, **kwargs)

    def image(self, n: int, *args: Any, **kwargs: Any) -> None:
        self._hold(n, "image", *args, **kwargs)

    def quality_scores(self, n: int, *args: Any, **kwargs: Any) -> None:
        self._hold(n, "quality_scores", *args, **kwargs)

    def user_scene_summary(self, scene: ScenePlan) -> None:
        self.pending.setdefault(scene.scene_number, []).append(("user_scene_summary", (scene,), {}))

    def selected(self, scene: SceneResult, *args: Any, **kwargs: Any) -> None:
        self.pending.setdefault(scene.scene_number, []).append(("selected", (scene, *args), kwargs))

    async def publish(self, scene_number: int) -> None:
        """Write the scene's files under the guide's names: call only after its checkpoint."""
        await self._write(self.writer, self.pending.pop(scene_number, []))

    async def keep_unfinished(self) -> None:
        """The run failed: keep its unfinished scenes' files in its own attempt folders. Best
        effort: a failure here is logged and never hides the error that ended the run."""
        if not self.pending:
            return
        writer = TraceWriter(self.writer.store, self.writer.generation_id, artifacts=self.writer.artifacts,
                             folder=f"attempt_{self.attempt}")
        for scene_number in sorted(self.pending):
            try:
                await self._write(writer, self.pending.pop(scene_number))
            except Exception as exc:
                log.warning("generation %s: trace files of unfinished scene %d not kept: %r",
                            self.writer.generation_id, scene_number, exc)

    @staticmethod
    async def _write(writer: TraceWriter, calls: list[tuple[str, tuple, dict]]) -> None:
        for method, args, kwargs in calls:
            await _blocking(getattr(writer, method), *args, **kwargs)


async def run_generation(
    generation_id: str, request: GenerationRequest, services: Services, settings: PipelineSettings, **options: Any
) -> list[SceneResult]:
    """Run (or resume) one generation and return its scenes in order; the options and what is
    raised: _run_generation. Its store calls wait through an object-store outage for
    `settings.s3.outage_wait_s`; a store still failing after that ends the generation with a
    GenerationError, retryable for an outage (a resume continues it once the store is back),
    not for a store that refuses (credentials, a missing bucket: the configuration)."""
    token = _OUTAGE.set(_OutageWait(settings.s3.outage_wait_s))
    try:
        return await _run_generation(generation_id, request, services, settings, **options)
    except ObjectStoreError as exc:
        log.error("generation %s: object store failure: %s", generation_id, exc)
        if isinstance(exc, ObjectStoreUnavailable):
            raise GenerationError(
                f"the object store was unreachable for longer than {settings.s3.outage_wait_s:g} s (an outage); "
                "finished scenes are kept", retryable=True,
            ) from exc
        raise GenerationError(
            "the object store refused a request (a configuration problem: see the service log); finished scenes are kept"
        ) from exc
    finally:
        _OUTAGE.reset(token)


@dataclass
class _Run:
    """One run of a generation: what its steps share, handed to each of them as one object
    instead of a dozen parameters. `reached` is the progress reported so far (never less)."""

    generation_id: str
    request: GenerationRequest
    services: Services
    settings: PipelineSettings
    traces: TraceWriter  # the trace tree itself (cleanup)
    staged: "_StagedTraces"  # a scene's trace files, written once its checkpoint stands
    storyboard: list[ScenePlan] | None
    reached: int
    on_event: Callback = None
    on_plan: Callback = None
    on_scene: Callback = None
    results: dict[int, SceneResult] = field(default_factory=dict)  # the selected scenes, by number
    first_image: bytes | None = None  # scene 1's image, read once for the consistency references

    @property
    def attempt(self) -> str:
        return self.staged.attempt

    async def emit(
        self, stage: str, progress: int, message: str, scene: int | None = None, *, kind: str | None = None,
        data: dict | None = None,
    ) -> None:
        """Report progress: never below what the job showed before this run, nor below what this
        run reported, also when a resumed job re-enters early stages."""
        self.reached = max(self.reached, progress)
        total = len(self.storyboard) if self.storyboard else None
        await _call(self.on_event, ProgressEvent(stage, self.reached, message, scene, total, kind, data or {}))

    def scene_progress(self, done: int) -> int:
        """The progress once `done` scenes are selected: the scenes share 25-100."""
        return _ENHANCED + (100 - _ENHANCED) * done // len(self.storyboard)


async def _run_generation(
    generation_id: str,
    request: GenerationRequest,
    services: Services,
    settings: PipelineSettings,
    *,
    reference_image: bytes | None = None,
    reference_key: str | None = None,
    storyboard: list[ScenePlan] | None = None,
    completed: list[SceneResult] = (),
    start_progress: int = 0,
    on_event: Callback = None,
    on_plan: Callback = None,
    on_scene: Callback = None,
    attempt: str | None = None,
) -> list[SceneResult]:
    """Run (or resume) one generation and return its scenes in order.

    `reference_image` (PNG bytes) becomes scene 1 unchanged; `reference_key` names such an image
    already in the artifact store (the job's persisted upload), used as it is, never re-stored.
    `storyboard` and `completed` come from a checkpoint when resuming, and `start_progress` is
    the progress the job already shows: no event reports less, so a resumed job's progress never
    goes backwards, even when no scene of it was finished (its planning and enhancement steps
    would otherwise report 5-25 again). Raises GenerationError
    with a user-facing reason (and `retryable`), or the first unexpected error of any of its
    concurrent steps; a cancellation of the calling task propagates as CancelledError, after
    every child has stopped and every write in progress has landed.

    `attempt` names this run in the keys it writes (default: a fresh random id). Images go to
    keys no other run writes, and a scene's trace files are written only once its checkpoint
    was accepted (see _StagedTraces): a run that lost its lease but is still alive can never
    change the bytes behind a scene another run checkpointed.
    """
    try:
        check_services(services, settings)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc
    traces = await _blocking(  # opening an S3 trace store checks its bucket: a round trip
        TraceWriter,
        services.traces if services.traces is not None else settings.traces.root,
        generation_id,
        artifacts=services.artifacts,  # trace images name the stored artifact: stored once, not twice
        s3=settings.s3,
    )
    staged = _StagedTraces(traces, check_attempt(attempt or uuid.uuid4().hex[:12]))
    run = _Run(
        generation_id, request, services, settings, traces, staged, storyboard,
        reached=max(0, min(100, int(start_progress))), on_event=on_event, on_plan=on_plan, on_scene=on_scene,
        results={s.scene_number: s for s in completed},
    )
    try:
        return await _run(run, reference_image, reference_key)
    except GenerationError:  # the run's own verdict; a lost lease or a cancellation keeps nothing
        await staged.keep_unfinished()
        raise


async def _run(run: _Run, reference_image: bytes | None, reference_key: str | None) -> list[SceneResult]:
    if run.storyboard is None:
        await _plan(run, reference_image, reference_key)
    storyboard, results = run.storyboard, run.results
    if results:
        run.reached = max(run.reached, run.scene_progress(len(results)))
    planned = [{"scene_number": s.scene_number, "duration": s.duration, "description": s.description or s.prompt}
               for s in storyboard]
    await run.emit("planning", _PLANNED, f"storyboard has {len(storyboard)} scenes", kind="planned",
                   data={"scenes": planned})

    if (reference_image is not None or reference_key is not None) and 1 not in results:
        results[1] = await _user_scene(run, storyboard[0], reference_image, reference_key)
        await _call(run.on_scene, results[1])
        await run.staged.publish(1)
        await run.emit("scene_completed", run.reached, "scene 1 is your image", 1, kind="selected",
                       data={"user_provided": True, "image_key": results[1].reference_image_key})

    pending = [scene for scene in storyboard if scene.scene_number not in results]
    meters = {scene.scene_number: Meter() for scene in pending}  # each scene's bill and clock
    enhanced = await _enhance_all(run, pending, meters)

    for scene in pending:
        n, total = scene.scene_number, len(storyboard)
        previous = results.get(n - 1)
        reference = await _blocking(run.services.artifacts.get, previous.reference_image_key) if previous else None
        references = await _consistency_references(run, previous, reference)
        result = await _generate_scene(run, scene, enhanced[n], reference, references, meters[n])
        results[n] = result
        await _call(run.on_scene, result)
        await run.staged.publish(n)  # the checkpoint stands: now its trace files
        done = sum(1 for s in storyboard if s.scene_number in results)
        await run.emit("scene_completed", run.scene_progress(done), f"scene {n} of {total} selected", n,
                       kind="selected", data=_selected(result, run.request))

    # Every scene is checkpointed: from here on nothing may fail the generation.
    if not run.settings.traces.keep:
        try:
            await _blocking(run.traces.cleanup)
        except Exception as exc:
            log.warning("generation %s: trace cleanup failed (the traces stay): %r", run.generation_id, exc)
    try:
        await run.emit("completed", 100, "generation completed")
    except Exception as exc:
        log.warning("generation %s: the completion event failed: %r", run.generation_id, exc)
    return [results[s.scene_number] for s in storyboard]


async def _plan(run: _Run, reference_image: bytes | None, reference_key: str | None) -> None:
    """Plan the storyboard (reading the user's image, when there is one) and hand it to `on_plan`."""
    await run.emit("planning", 0, "planning the storyboard")
    services, settings, request = run.services, run.settings, run.request
    try:
        user_png = None
        if reference_image is not None:
            user_png = await asyncio.to_thread(_as_png, reference_image)
        elif reference_key is not None:
            user_png = await _blocking(services.artifacts.get, reference_key)
        meter = Meter()  # the storyboard call's cost and time, stored with the storyboard
        with meter.stage("planning"):
            storyboard = await plan_storyboard(
                services.chat, request.prompt, request.target_duration, retries=settings.llm.invalid_output_retries,
                image=user_png, accepts_images=settings.llm.reads_images(), markers=settings.storyboard.markers,
            )
    except Exception as exc:
        raise GenerationError(f"storyboard planning failed: {exc}", retryable=transient(exc)) from exc
    storyboard[0] = storyboard[0].model_copy(update={"planning": meter.planning(settings.pricing)})
    run.storyboard = storyboard
    await _call(run.on_plan, storyboard)


async def _consistency_references(run: _Run, previous: SceneResult | None, image: bytes | None) -> list[Reference]:
    """What a scene's variations are compared with: the previous scene's selected image
    (`image`) and scene 1's (the user's); none without a consistency client or a previous scene."""
    if run.services.consistency is None or previous is None:
        return []
    if previous.scene_number == 1:
        return [Reference(1, ["previous", "first"], image)]
    references = [Reference(previous.scene_number, ["previous"], image)]
    if 1 in run.results:
        if run.first_image is None:
            run.first_image = await _blocking(run.services.artifacts.get, run.results[1].reference_image_key)
        references.append(Reference(1, ["first"], run.first_image))
    return references


async def _user_scene(run: _Run, scene: ScenePlan, image: bytes | None, key: str | None) -> SceneResult:
    if key is None:
        data = await asyncio.to_thread(_as_png, image)
        key = await _blocking(run.services.artifacts.put,
                              f"{run.generation_id}/scene_1/attempt_{run.attempt}/user_reference.png", data)
    result = SceneResult(
        scene_number=1,
        duration=scene.duration,
        original_prompt=scene.prompt,
        enhanced_prompt=scene.prompt,
        reference_image_key=key,
        user_provided=True,
    )
    run.staged.original_prompt(1, scene.prompt)
    run.staged.user_scene_summary(scene)
    run.staged.selected(result, threshold=0)
    return result


async def _enhance_all(run: _Run, pending: list[ScenePlan], meters: dict[int, Meter]) -> dict[int, EnhancementResult]:
    """Enhancement needs no images, so every scene is enhanced at once, up front."""
    if not pending:
        return {}
    finished = 0
    settings = run.settings

    async def one(scene: ScenePlan) -> EnhancementResult:
        nonlocal finished
        run.staged.original_prompt(scene.scene_number, scene.prompt)
        meter = meters.get(scene.scene_number) or Meter()
        async def iteration(record) -> None:  # live: each iteration as soon as it is decided
            await run.emit("enhancing", 0, _iteration_message(scene.scene_number, record), scene.scene_number,
                           kind="iteration", data=_iteration(record))

        with meter.stage("enhancement"):
            result = await enhance_scene(
                run.services.chat,
                scene,
                run.request.prompt,
                max_iterations=run.request.advanced_image_max_enhancement_iterations,
                settings=settings.enhancement,
                retries=settings.llm.invalid_output_retries,
                on_iteration=iteration,
            )
        hooks().enhancement_iterations(result.total_iterations)
        run.staged.enhancement(scene.scene_number, result, scene=scene, extra=_enhancement_cost(meter, settings))
        finished += 1
        score = f"{result.final_overall:.1f}" if result.final_overall is not None else "unscored"
        await run.emit(
            "enhancing",
            _PLANNED + (_ENHANCED - _PLANNED) * finished // len(pending),
            f"scene {scene.scene_number} prompt enhanced in {result.total_iterations} iteration(s), score {score}",
            scene.scene_number,
            kind="enhanced",
            data={"iterations": result.total_iterations, "score": result.final_overall, "approved": result.approved,
                  "stop_reason": result.stop_reason, "final_prompt": result.final_prompt},
        )
        return result

    results = await all_or_nothing(one(scene) for scene in pending)
    return {scene.scene_number: result for scene, result in zip(pending, results)}


async def _generate_scene(
    run: _Run, scene: ScenePlan, enhancement: EnhancementResult, reference: bytes | None,
    references: list[Reference], meter: Meter,
) -> SceneResult:
    """One scene: its variations (chained on `reference`), scored, ranked, the best selected."""
    n, request = scene.scene_number, run.request
    prompt = enhancement.final_prompt
    progress = run.scene_progress(n - 1)
    variations, received = await _variations(run, scene, prompt, reference, progress, meter)
    await run.emit("scoring", progress, f"scene {n}: scoring {len(received)} variations", n)
    weights = run.settings.scoring.weights.as_dict()
    selection = run.settings.scoring.weights.selection()
    # What the text-image scorers compare with: the scene's own content by default.
    text = scene_text(scene) if run.settings.scoring.text == "scene" else prompt
    info = {"text_source": run.settings.scoring.text, "text": text}
    try:
        await _score(run, received, text, references, selection, meter)
    except Exception as exc:
        scoring = _scoring_info(info, selection, variations, run.services, references)
        run.staged.quality_scores(n, prompt, weights, variations, scoring=scoring)
        raise GenerationError(f"scene {n}: scoring failed: {exc}", retryable=transient(exc)) from exc
    await run.emit("scoring", progress, f"scene {n}: {len(received)} variations scored", n, kind="scored",
                   data={"variations": [_scored(v) for v in variations]})
    best = rank(variations)[0]
    hooks().selected_quality(best.overall)
    cost, timing = meter.close(run.settings.pricing)
    below = best.overall < request.advanced_image_quality_threshold
    if below:
        log.warning(
            "scene %d: best quality score %.2f is below the threshold %.2f; continuing",
            n, best.overall, request.advanced_image_quality_threshold,
        )
    result = SceneResult(
        scene_number=n,
        duration=scene.duration,
        original_prompt=scene.prompt,
        enhanced_prompt=prompt,
        prompt_score=enhancement.final_overall,
        reference_image_key=best.image_key,
        quality_score=best.overall,
        consistency_score=best.consistency.score if best.consistency is not None else None,
        below_threshold=below,
        selected_variation=best.variation,
        variations=variations,
        cost=cost,
        timing=timing,
    )
    scoring = _scoring_info(info, selection, variations, run.services, references)
    accounting = {"cost": cost.model_dump(mode="json"), "timing": timing.model_dump(mode="json")}
    run.staged.quality_scores(n, prompt, weights, variations, scoring=scoring, extra=accounting)
    run.staged.selected(result, request.advanced_image_quality_threshold, formula=scoring["formula"])
    return result


async def _variations(
    run: _Run, scene: ScenePlan, prompt: str, reference: bytes | None, progress: int, meter: Meter,
) -> tuple[list[VariationResult], list[tuple[VariationResult, bytes]]]:
    """The scene's variations, generated at once: all of them (a failed one records its error)
    and the received ones with their PNG bytes. Raises GenerationError when none was received."""
    n, count = scene.scene_number, run.request.advanced_image_num_variations
    await run.emit("generating", progress, f"scene {n}: generating {count} variations", n,
                   data={"variations": count, "chained": reference is not None})
    failures: dict[int, bool] = {}  # variation -> whether its failure was transient

    async def failed(k: int, error: str) -> tuple[VariationResult, None]:
        await run.emit("generating", progress, f"scene {n}: variation {k} failed", n, kind="variation",
                       data={"variation": k, "ok": False, "error": error})
        return VariationResult(variation=k, error=error), None

    async def variation(k: int) -> tuple[VariationResult, bytes | None]:
        try:
            image = await run.services.images.generate(prompt, reference=reference, variation=k)
            data = await asyncio.to_thread(_as_png, image.data)  # a full decode: off the event loop
        except ProviderError as exc:
            log.warning("scene %d variation %d failed: %s", n, k, exc)
            failures[k] = exc.retryable
            return await failed(k, str(exc))
        except Exception as exc:  # an undecodable image, a client bug: recorded, the scene goes on
            log.warning("scene %d variation %d failed: %r", n, k, exc)
            failures[k] = transient(exc)
            return await failed(k, f"{type(exc).__name__}: {exc}")
        key = await _blocking(run.services.artifacts.put,
                              f"{run.generation_id}/scene_{n}/attempt_{run.attempt}/variation_{k}.png", data)
        run.staged.image(n, k, data, artifact_key=key)
        await run.emit("generating", progress, f"scene {n}: variation {k} received", n, kind="variation",
                       data={"variation": k, "ok": True, "image_key": key})
        return VariationResult(variation=k, image_key=key, provider_metadata=image.metadata), data

    with meter.stage("generation"):
        outcomes = await all_or_nothing(variation(k) for k in range(1, count + 1))
    variations = [v for v, _ in outcomes]
    received = [(v, data) for v, data in outcomes if data is not None]
    meter.add([image_usage(v.provider_metadata) for v, _ in received], stage="generation")
    for v, _ in received:
        hooks().images_generated(str(v.provider_metadata.get("provider", "unknown")), 1)
    if not received:
        reasons = "; ".join(f"variation {v.variation}: {v.error}" for v in variations)
        # Worth resuming when any variation failed for a transient reason: it may succeed later.
        raise GenerationError(f"scene {n}: no image could be generated ({reasons})", retryable=any(failures.values()))
    return variations, received


async def _score(
    run: _Run, received: list[tuple[VariationResult, bytes]], text: str, references: list[Reference],
    selection: dict, meter: Meter,
) -> None:
    """Score the received variations (the text-image scorers and, with references, consistency,
    at once) and set each one's scores, consistency and overall."""
    images = [data for _, data in received]
    consistency_client = run.services.consistency

    async def consistency() -> list:
        if consistency_client is None or not references:
            return [None] * len(received)
        return await measure_consistency(consistency_client, images, list(references))

    with meter.stage("scoring"):
        scores, measured = await all_or_nothing([run.services.scoring.score(images, [text] * len(received)), consistency()])
    for (v, _), per_scorer, kept in zip(received, scores, measured):
        v.scores = per_scorer
        v.consistency = kept
        v.overall = selection_overall(per_scorer, selection, kept)


def _iteration(record) -> dict:
    """An enhancement iteration as its event shows it."""
    return {
        "iteration": record.iteration,
        "overall": record.overall,
        "scores": record.scores.model_dump() if record.scores is not None else None,
        "critique": record.critique,
        "enhanced_prompt": record.enhanced_prompt,
        "error": record.error,
    }


def _iteration_message(n: int, record) -> str:
    if record.error:
        return f"scene {n} iteration {record.iteration}: {record.error}"
    score = f"{record.overall:.1f}" if record.overall is not None else "unscored"
    return f"scene {n} iteration {record.iteration}: prompt score {score}"


def _scored(v: VariationResult) -> dict:
    return {
        "variation": v.variation,
        "overall": v.overall,
        "scores": {name: s.score for name, s in v.scores.items()},
        "consistency": v.consistency.score if v.consistency is not None else None,
        "error": v.error,
    }


def _selected(result: SceneResult, request: GenerationRequest) -> dict:
    return {
        "variation": result.selected_variation,
        "overall": result.quality_score,
        "below_threshold": result.below_threshold,
        "threshold": request.advanced_image_quality_threshold,
        "consistency": result.consistency_score,
        "image_key": result.reference_image_key,
    }


def _scoring_info(info: dict, selection: dict, variations, services: Services, references) -> dict:
    """What quality_scores.json says about how the variations were scored: the text and where
    it came from, which scorers had to cut it, the consistency references, and the overall's
    formula (renormalised when consistency counts)."""
    truncated = sorted({name for v in variations for name, s in v.scores.items() if s.truncated})
    weight = selection.get("consistency", 0.0)
    measured = any(v.consistency is not None for v in variations)
    renormalised = weight > 0 and measured
    if services.consistency is None:
        note = "consistency not measured: no consistency scorer is configured"
    elif not references:
        note = "consistency not measured for this scene: it has no reference image (scene 1)"
    elif renormalised:
        note = f"consistency counts with weight {weight:g}: overall renormalised by the sum of the weights"
    else:
        note = "consistency measured and reported; weight 0: not used in selection"
    return {
        **info,
        "truncated_by": truncated,
        "consistency_references": [{"scene_number": r.scene_number, "roles": r.roles} for r in references],
        "renormalised": renormalised,
        "formula": formula(selection, renormalised),
        "note": note,
    }


def _enhancement_cost(meter: Meter, settings: PipelineSettings) -> dict:
    """prompt_trace_summary.json's additive keys: the agents' calls priced and timed, and how
    their replies were constrained (structured outputs, JSON mode, a fallback)."""
    calls = [c for c in meter.calls if c.stage == "enhancement"]
    cost = summarize(calls, settings.pricing)
    return {"cost": cost.model_dump(mode="json"), "timing": {"enhancement_s": round(meter.seconds.get("enhancement", 0.0), 3)},
            "structured_output": structured_output_summary(calls)}
