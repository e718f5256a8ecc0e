"""One Serve deployment class for all four scoring models; the app binds it four times under
the names PickScore, CLIPScore, VQAScore and Aesthetic, each with its own GPU fraction.

A request is one of two kinds, each with its own method: `score_text(image, prompt)` (the
text-image models) and `score_pair(image, reference)` (the consistency model, an image against a
reference image). `@serve.batch` merges them across variations, scenes and concurrent generations. Batch size and wait time come from `user_config`, so
`serve deploy` can change them without restarting the replica.

`@serve.batch` forms a batch as soon as its wait time has passed, even while the model is
still busy with the previous one; under load every request that arrives during a forward pass
would then wait as a batch of its own (measured: mean batch 1.4 with 20 requests waiting,
docs/benchmarks.md). So Serve's batches are handed to a coalescer that runs one forward pass
at a time over everything waiting when the model frees, up to `max_batch_size` images.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union, get_args

import ray
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

import scorers
from deployments.metrics import install as install_metrics
from pipeline.ranking import InputPath, decode_input
from pipeline.telemetry import hooks
from scorers.ensemble import EmbeddingCache
from scorers.images import read_header


class BatchConfig(BaseModel):
    """A scorer deployment's `user_config`: applied by `reconfigure`, so `serve deploy` changes
    it without reloading the model."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)
    health_check_cache_s: float = Field(
        5.0, ge=0, le=300,
        description="a forward pass that succeeded this recently proves the model healthy; only an idle or "
        "failing replica runs the health probe",
    )


class ScorerServing(BaseModel):
    """How one scorer is served, in the app's typed args (`AppArgs.scorers.<name>`), validated
    before anything starts. The Serve options follow from it in `scorer_deployment_options`, as
    Ray's LLM builder derives its deployment options from its typed config; a YAML
    `deployments:` entry for a scorer is therefore not needed (and would override them)."""

    model_config = ConfigDict(extra="forbid")

    batch: BatchConfig = BatchConfig()
    num_cpus: float = Field(1.0, ge=0, description="CPU reserved per replica (decode, resize, tokenise)")
    num_gpus: float = Field(0.0, ge=0, le=1, description="fraction of one GPU per replica; fractions pack onto one card")
    threads: int | None = Field(
        None, ge=1, le=256,
        description="torch intra-op threads in the replica; default max(1, num_cpus). Set explicitly because "
        "Ray sets OMP_NUM_THREADS=1 for actors that reserve no CPU",
    )
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (or autoscaling_config)")
    autoscaling_config: dict | None = Field(None, description="Serve's AutoscalingConfig fields")

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "ScorerServing":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.autoscaling_config is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig(**self.autoscaling_config)  # Serve's own validation, now, not at deploy
        return self

    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


MAX_PENDING_BATCHES = 8  # Serve batches that may wait for the model; the coalescer merges them


def scorer_deployment_options(serving: ScorerServing | dict | None = None) -> dict:
    """Serve options of a scorer deployment, derived from its typed serving config.

    `max_ongoing_requests` must let MAX_PENDING_BATCHES full Serve batches wait while the model
    runs, or the coalescer never sees enough requests to fill a pass; it is derived here rather
    than written by hand beside `max_batch_size` in a config. `user_config` carries the
    validated batch settings to `reconfigure`.
    """
    serving = ScorerServing.model_validate(serving or {})
    options = {
        "max_ongoing_requests": MAX_PENDING_BATCHES * serving.batch.max_batch_size,
        "user_config": serving.batch.model_dump(),
        "ray_actor_options": {"num_cpus": serving.num_cpus, "num_gpus": serving.num_gpus},
    }
    if serving.autoscaling_config is not None:
        options["autoscaling_config"] = serving.autoscaling_config
    elif serving.num_replicas is not None:
        options["num_replicas"] = serving.num_replicas
    return options


class ItemError(RuntimeError):
    """One input that its forward pass could not score, even on its own. It stands in the
    result list in place of that input's output, so the other inputs of the same Serve batch
    (often other jobs' requests) keep their scores; `score` raises it to that caller only."""


class Coalescer:
    """One forward pass at a time over all waiting requests, up to `max_items`; a group
    (one Serve batch) is never split, so each caller gets its results back whole.

    A merged pass that raises is retried in smaller pieces, so one bad input never fails
    other callers: each group alone, then, in a group that still fails, each item alone.
    An item that fails alone gets an `ItemError` in its slot that names it (its position in
    its group and `describe(item)`). A group whose caller has gone (its future cancelled)
    is dropped before any pass, first or retried: nobody would read its result.
    """

    def __init__(self, forward, max_items: int, describe=repr):
        self.forward, self.max_items, self.describe = forward, max_items, describe
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        """The outputs of `items`, in order; a failed item's slot holds its `ItemError`."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((items, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    def _next_groups(self) -> list[tuple[list, asyncio.Future]]:
        self.pending = [(items, future) for items, future in self.pending if not future.done()]
        if not self.pending:
            return []
        groups = [self.pending.pop(0)]
        while self.pending and sum(len(g) for g, _ in groups) + len(self.pending[0][0]) <= self.max_items:
            groups.append(self.pending.pop(0))
        return groups

    async def _drain(self) -> None:
        while groups := self._next_groups():
            try:
                outputs = await self.forward([item for items, _ in groups for item in items])
            except Exception as exc:
                if len(groups) == 1:
                    await self._isolate_items(*groups[0], exc)
                else:
                    for items, future in groups:
                        await self._run_group(items, future)
            else:
                start = 0
                for items, future in groups:
                    if not future.done():
                        future.set_result(outputs[start : start + len(items)])
                    start += len(items)
            # Let the Serve batches that were waiting for a free slot join before the next pass.
            await asyncio.sleep(0.002)

    async def _run_group(self, items: list, future: asyncio.Future) -> None:
        if future.done():  # cancelled while an earlier piece ran
            return
        try:
            outputs = await self.forward(items)
        except Exception as exc:
            await self._isolate_items(items, future, exc)
        else:
            if not future.done():
                future.set_result(outputs)

    async def _isolate_items(self, items: list, future: asyncio.Future, group_error: Exception) -> None:
        outputs: list = []
        for index, item in enumerate(items):
            if future.done():
                return
            if len(items) == 1:
                error = group_error  # it already failed on its own
            else:
                try:
                    outputs.extend(await self.forward([item]))
                    continue
                except Exception as exc:
                    error = exc
            failed = ItemError(
                f"item {index + 1} of {len(items)} in its batch, {self.describe(item)}: "
                f"{type(error).__name__}: {error}"
            )
            failed.__cause__ = error
            outputs.append(failed)
        if not future.done():
            future.set_result(outputs)


@dataclass(frozen=True)
class TextImage:
    """A text-image request: how well `image` (PNG bytes) shows `prompt`."""

    image: bytes
    prompt: str


@dataclass(frozen=True)
class ImagePair:
    """An image-image request: how consistent `image` is with `reference` (both PNG bytes)."""

    image: bytes
    reference: bytes


ScoringRequest = Union[TextImage, ImagePair]


def describe_request(request: ScoringRequest) -> str:
    """How an error names one scoring input: its size and, when its header reads, its format
    and pixel size (the header only; the image is not decoded here)."""
    described = _describe_image(request.image)
    if isinstance(request, ImagePair):
        described += f" against a reference {_describe_image(request.reference)}"
    return described


def _describe_image(data: bytes) -> str:
    try:
        header = read_header(data)
    except Exception:
        return f"image of {len(data)} bytes (not a readable image)"
    return f"image of {len(data)} bytes ({header.format} {header.width}x{header.height} px)"


def probe_image() -> Image.Image:
    """A small gradient for the health probe: flat images can hide broken preprocessing."""
    image = Image.new("RGB", (48, 32))
    image.putdata([(x * 5, y * 8, (x + y) * 3) for y in range(32) for x in range(48)])
    return image


class UnhealthyModel(RuntimeError):
    """The replica's model no longer gives usable scores; Serve replaces the replica."""


DEFAULT_BATCH = BatchConfig()
INPUT_PATHS = get_args(InputPath)


def content_key(data: bytes) -> bytes:
    """What identifies an input image across requests: a digest of its bytes (the same image
    arrives again as the reference of later scenes)."""
    return hashlib.blake2b(data, digest_size=16).digest()


class ScoringReplica(abc.ABC):
    """What a scoring replica does whatever models it holds: torch threads from its config,
    batch settings applied by `reconfigure`, one forward pass at a time through the coalescer,
    each distinct image decoded once per pass, health from recent passes or a probe, and figures
    for the benchmarks.

    A subclass says which models it holds through the hooks declared abstract below, so a new
    layout cannot forget one and fail only when Serve first calls it."""

    input_path = "pil"  # until _setup: instances made without __init__ (tests) use the reference path

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """How health errors name this replica (its model, or "Scoring")."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the models compute, for `device_stats`."""

    @abc.abstractmethod
    def _score_texts(self, images: list, prompts: list[str]) -> list:
        """One output per decoded image and its prompt (runs in a worker thread)."""

    @abc.abstractmethod
    def _score_pairs(self, pairs: list[ImagePair], decode: Callable[[bytes], object]) -> list:
        """One output per image pair; `decode` turns bytes into a model input, once per image
        in the pass (runs in a worker thread)."""

    @abc.abstractmethod
    def _probe(self) -> list:
        """Outputs of one small probe through every model the replica holds."""

    @abc.abstractmethod
    def _named(self, output) -> list[tuple[str, object]]:
        """(model name, ScoreOutput) of each score in one output, for the finiteness check."""

    @abc.abstractmethod
    def _result(self, output) -> dict:
        """One output as the plain dict the caller receives."""

    def _setup(self, threads: int, input_path: str) -> None:
        # Ray leaves OMP_NUM_THREADS=1 in actors that reserve no CPU; the config says how many.
        torch.set_num_threads(threads)
        install_metrics()  # batch sizes and forward-pass times (deployments/metrics.py)
        if input_path not in INPUT_PATHS:
            raise ValueError(f"unknown input_path {input_path!r}: use one of {', '.join(INPUT_PATHS)}")
        self.input_path = input_path
        self.batch_sizes: list[int] = []  # recent forward-pass sizes, for tests and the benchmark
        self.coalescer = Coalescer(self._forward, max_items=DEFAULT_BATCH.max_batch_size, describe=describe_request)
        self.health_check_cache_s = DEFAULT_BATCH.health_check_cache_s
        self.healthy_at = -math.inf  # monotonic time of the last forward pass with usable scores
        self.probes = 0  # health probes run, for tests

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config or {})
        self.score_batch.set_max_batch_size(config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.coalescer.max_items = config.max_batch_size
        self.health_check_cache_s = config.health_check_cache_s

    @serve.batch(
        max_batch_size=DEFAULT_BATCH.max_batch_size,
        batch_wait_timeout_s=DEFAULT_BATCH.batch_wait_timeout_s,
        max_concurrent_batches=MAX_PENDING_BATCHES,
    )
    async def score_batch(self, requests: list[ScoringRequest]) -> list:
        return await self.coalescer.submit(requests)

    async def _forward(self, requests: list[ScoringRequest]) -> list:
        self.batch_sizes = (self.batch_sizes + [len(requests)])[-1000:]
        # Decoding and the forward pass are CPU/GPU work: off the event loop, so new requests
        # keep arriving meanwhile.
        outputs = await asyncio.to_thread(self._score, requests)
        self._check_finite(outputs)
        self.healthy_at = time.monotonic()
        return [self._result(output) for output in outputs]

    def _score(self, requests: list[ScoringRequest]) -> list:
        """One pass over both kinds of request, in order. Each distinct image is decoded once,
        through the one image intake: an ImageError fails the pass, and the coalescer's
        isolation names the bad image to its own caller."""
        decoded: dict[bytes, object] = {}

        def decode(data: bytes):
            key = content_key(data)
            if key not in decoded:
                decoded[key] = decode_input(data, self.input_path)
            return decoded[key]

        texts = [i for i, request in enumerate(requests) if isinstance(request, TextImage)]
        pairs = [i for i, request in enumerate(requests) if isinstance(request, ImagePair)]
        outputs: list = [None] * len(requests)
        if texts:
            scored = self._score_texts([decode(requests[i].image) for i in texts], [requests[i].prompt for i in texts])
            for i, output in zip(texts, scored):
                outputs[i] = output
        if pairs:
            for i, output in zip(pairs, self._score_pairs([requests[i] for i in pairs], decode)):
                outputs[i] = output
        return outputs

    @staticmethod
    def _as_dict(output) -> dict:
        return {"raw": output.raw, "score": output.score, "truncated": output.truncated}

    def _check_finite(self, outputs) -> None:
        """NaN or inf is never a score: it comes from broken weights or a failing device, and
        passing it on would rank images by noise."""
        for output in outputs:
            for name, one in self._named(output):
                if not (math.isfinite(one.raw) and math.isfinite(one.score)):
                    raise UnhealthyModel(f"{name} gave a non-finite score: its weights or device are broken")

    async def score_text(self, image: bytes | ray.ObjectRef, prompt: str) -> dict:
        """How well `image` (PNG bytes) shows `prompt`, by every text-image model this replica
        holds. The ingress puts each image into the object store once and passes the same
        ObjectRef to every scoring deployment as a top-level argument, which Ray resolves to the
        bytes before this runs (a node fetches the object once for all its replicas). Where Serve
        does not resolve it (local testing mode), the reference is awaited here. An input the
        model cannot score raises here, to its own caller only (`ItemError`)."""
        return await self._submit(TextImage(await _resolved(image), prompt))

    async def score_pair(self, image: bytes | ray.ObjectRef, reference: bytes | ray.ObjectRef) -> dict:
        """How consistent `image` is with `reference` (both PNG bytes or ObjectRefs, as in
        `score_text`), by the consistency model."""
        return await self._submit(ImagePair(await _resolved(image), await _resolved(reference)))

    async def _submit(self, request: ScoringRequest) -> dict:
        result = await self.score_batch(request)
        if isinstance(result, Exception):
            raise result
        return result

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    async def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising makes Serve replace the
        replica. A forward pass that gave usable scores within `health_check_cache_s` is proof
        enough, so a busy replica pays nothing; otherwise one small image goes through the real
        model(s), and an error or a non-finite score fails the check."""
        if time.monotonic() - self.healthy_at < self.health_check_cache_s:
            return
        self.probes += 1
        try:
            outputs = await asyncio.to_thread(self._probe)
            self._check_finite(outputs)
        except Exception as exc:
            raise UnhealthyModel(f"{self.label} health probe failed: {type(exc).__name__}: {exc}") from exc
        self.healthy_at = time.monotonic()

    def health_probes(self) -> int:
        return self.probes

    def device_stats(self) -> dict:
        """The device this replica computes on and, on a GPU, its peak and reserved memory in
        bytes (None on a CPU: not measured, rather than a zero that looks like a figure)."""
        device = self.device
        if device.type != "cuda":
            return {"device": str(device), "max_memory_allocated": None, "memory_reserved": None}
        return {
            "device": f"{device} ({torch.cuda.get_device_name(device)})",
            "max_memory_allocated": torch.cuda.max_memory_allocated(device),
            "memory_reserved": torch.cuda.memory_reserved(device),
        }


async def _resolved(value):
    """An ObjectRef's bytes (Serve resolves top-level ones itself, except in local testing mode)."""
    return await value if isinstance(value, ray.ObjectRef) else value


def load_model(name: str, options: dict | None, offline_models_dir: str | None):
    options = dict(options or {})
    if offline_models_dir:
        from scorers.tiny import build_tiny_models

        options = {**build_tiny_models(Path(offline_models_dir))[name], **options}
    return scorers.load_scorer(name, **options)


@serve.deployment(
    # Derived, not written by hand: see scorer_deployment_options.
    max_ongoing_requests=scorer_deployment_options()["max_ongoing_requests"],
    health_check_period_s=10,
)
class ScorerDeployment(ScoringReplica):
    """One scoring model per replica (the `separate` layout)."""

    image_pairs = False  # until __init__: instances made without it (tests) take prompts

    def __init__(self, name: str, options: dict | None = None, offline_models_dir: str | None = None, threads: int = 1,
                 input_path: str = "pil"):
        self._setup(threads, input_path)
        self.name = name
        # An image-image scorer (consistency) takes pairs (`score_pair`); the others prompts (`score_text`).
        self.image_pairs = name in scorers.IMAGE_SCORER_NAMES
        self.model = load_model(name, options, offline_models_dir)  # once per replica
        self.pairs = EmbeddingCache(self.model) if self.image_pairs else None

    @property
    def label(self) -> str:
        return self.name

    @property
    def device(self) -> torch.device:
        return self.model.device

    async def _forward(self, requests: list[ScoringRequest]) -> list[dict]:
        started = time.perf_counter()
        results = await super()._forward(requests)
        hooks().scorer_batch(self.name, len(requests), time.perf_counter() - started)
        return results

    def _named(self, output):
        return [(self.name, output)]

    def _result(self, output) -> dict:
        return self._as_dict(output)

    def _score_texts(self, images: list, prompts: list[str]) -> list:
        if self.image_pairs:
            raise ValueError(f"{self.name} scores image pairs (score_pair), not prompts")
        return self.model.score(images, prompts)

    def _score_pairs(self, pairs: list[ImagePair], decode) -> list:
        if not self.image_pairs:
            raise ValueError(f"{self.name} scores prompts (score_text), not image pairs")
        # Each image decoded and embedded once, however often it is compared.
        keyed = [(content_key(p.image), p.image, content_key(p.reference), p.reference) for p in pairs]
        return self.pairs.similarity(keyed, decode)

    def _probe(self):
        other = probe_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.image_pairs else "a health check image"
        return self.model.score([probe_image()], [other])
