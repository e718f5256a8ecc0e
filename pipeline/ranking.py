"""Combining the quality scores, ranking and selection.

The pipeline sees scorers only through `ScoringClient` (the four text-image scorers) and
`ConsistencyClient` (the image-image consistency model): in one process they are
`LocalScoring` / `LocalConsistency` over models from `scorers.load_scorer`; under Ray Serve,
adapters over deployment handles. Either way a scorer that cannot run raises: no made-up scores.
"""

from __future__ import annotations

import asyncio
from typing import Literal, NamedTuple, Protocol, Sequence

from PIL import Image

from pipeline.schemas import ConsistencyScore, ReferenceSimilarity, ScorerResult, VariationResult
from scorers.images import SCORER_INPUT, decode_tensor, open_image

InputPath = Literal["pil", "tensor"]


class ScoringError(RuntimeError):
    pass


class ScoringClient(Protocol):
    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        """Per image, each scorer's result keyed by scorer name."""


class ConsistencyClient(Protocol):
    async def similarity(self, images: list[bytes], references: list[bytes]) -> list[ScorerResult]:
        """images[i] compared with references[i], pair by pair: `raw` the model's similarity
        (cosine), `score` on 0-100. The Serve layer batches pairs like any scorer's requests."""


class ScoreModel(Protocol):
    """What `scorers.load_scorer` returns: raw score, 0-100 score, truncation flag per image."""

    name: str

    def score(self, images: list, prompts: list[str]) -> Sequence: ...


def weighted_overall(scores: dict[str, ScorerResult], weights: dict[str, float]) -> float:
    """sum(w_i * s_i) / sum(w_i) over scorers with a positive weight (0.50/0.25/0.15/0.10
    by default, which already sum to one)."""
    active = {name: w for name, w in weights.items() if w > 0}
    missing = [name for name in active if name not in scores]
    if missing:
        raise ScoringError(f"missing scores from {', '.join(missing)}")
    return round(sum(scores[name].score * w for name, w in active.items()) / sum(active.values()), 4)


def selection_overall(
    scores: dict[str, ScorerResult], weights: dict[str, float], consistency: ConsistencyScore | None
) -> float:
    """The selection score: `weighted_overall` of the four text-image scores, plus the
    consistency score with weight `weights["consistency"]` when it is above 0 and the variation
    has one, everything divided by the sum of the weights used (renormalised). With weight 0,
    or no consistency score (scene 1 has no reference), it is exactly the four-scorer formula."""
    text_weights = {name: w for name, w in weights.items() if name != "consistency"}
    weight = weights.get("consistency", 0.0)
    if weight <= 0 or consistency is None:
        return weighted_overall(scores, text_weights)
    active = {name: w for name, w in text_weights.items() if w > 0}
    missing = [name for name in active if name not in scores]
    if missing:
        raise ScoringError(f"missing scores from {', '.join(missing)}")
    total = sum(scores[name].score * w for name, w in active.items()) + consistency.score * weight
    return round(total / (sum(active.values()) + weight), 4)


def formula(weights: dict[str, float], renormalised: bool) -> str:
    """The overall's formula as the trace shows it."""
    used = {name: w for name, w in weights.items() if w > 0 and (renormalised or name != "consistency")}
    text = " + ".join(f"{w:g}*{name}" for name, w in used.items())
    total = sum(used.values())
    return f"({text}) / {total:g}" if abs(total - 1) > 1e-9 else text


class Reference(NamedTuple):
    """An image a scene's variations are compared with for consistency: the scene it was
    selected for, why it is a reference ("previous", "first") and its PNG bytes."""

    scene_number: int
    roles: list[str]
    image: bytes


async def measure_consistency(
    client: ConsistencyClient, images: list[bytes], references: list[Reference]
) -> list[ConsistencyScore]:
    """Each image against each reference in one call; the consistency of an image is the mean
    over its references of raw and 0-100 score."""
    pairs = [(i, r) for i in range(len(images)) for r in range(len(references))]
    results = await client.similarity([images[i] for i, _ in pairs], [references[r].image for _, r in pairs])
    if len(results) != len(pairs):
        raise ScoringError(f"consistency: {len(results)} results for {len(pairs)} pairs")
    measured = []
    for i in range(len(images)):
        found = [
            ReferenceSimilarity(scene_number=references[r].scene_number, roles=references[r].roles, raw=res.raw,
                                score=res.score)
            for (j, r), res in zip(pairs, results) if j == i
        ]
        measured.append(
            ConsistencyScore(
                raw=round(sum(f.raw for f in found) / len(found), 6),
                score=round(sum(f.score for f in found) / len(found), 4),
                references=found,
            )
        )
    return measured


def rank(variations: list[VariationResult]) -> list[VariationResult]:
    """Best first; ties go to the lower variation number, so a rerun picks the same image."""
    scored = [v for v in variations if v.overall is not None]
    ordered = sorted(scored, key=lambda v: (-v.overall, v.variation))
    for position, variation in enumerate(ordered, start=1):
        variation.rank = position
    return ordered


def decode_rgb(data: bytes) -> Image.Image:
    """Scorer input bytes as 8-bit RGB, through the one image intake (`scorers.images`): the
    same pixel limit, animation and mode rules as the scorer deployment. Raises ImageError."""
    return open_image(data, SCORER_INPUT)


def decode_input(data: bytes, input_path: InputPath = "pil"):
    """Scorer input bytes for `ScoringSettings.input_path`: a PIL RGB image ("pil", the
    reference path) or a uint8 RGB (3, H, W) CPU tensor that the scorers preprocess on their
    device ("tensor"). The same intake checks either way; raises ImageError."""
    if input_path == "tensor":
        return decode_tensor(data, SCORER_INPUT)
    if input_path != "pil":
        raise ValueError(f"unknown input_path {input_path!r}: 'pil' or 'tensor'")
    return decode_rgb(data)


class LocalScoring:
    """In-process scoring: each model scores the whole batch in a worker thread, so the
    event loop (and the other variations' I/O) keeps going while torch computes. Each image
    is decoded once for all models, as `input_path` says (`ScoringSettings.input_path`)."""

    def __init__(self, models: dict[str, ScoreModel], weights: dict[str, float], input_path: InputPath = "pil"):
        self.models = {name: model for name, model in models.items() if weights.get(name, 0) > 0}
        self.input_path = input_path

    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        pil = [decode_input(data, self.input_path) for data in images]
        results: list[dict[str, ScorerResult]] = [{} for _ in images]
        for name, model in self.models.items():
            try:
                outputs = await asyncio.to_thread(model.score, pil, prompts)
            except Exception as exc:
                raise ScoringError(f"scorer {name!r} failed: {exc}") from exc
            for slot, out in zip(results, outputs):
                slot[name] = ScorerResult(raw=float(out.raw), score=float(out.score), truncated=bool(out.truncated))
        return results


class LocalConsistency:
    """In-process consistency model (`scorers.load_scorer("consistency")`), scored in a
    worker thread like LocalScoring."""

    def __init__(self, model: ScoreModel, input_path: InputPath = "pil"):
        self.model = model
        self.input_path = input_path

    async def similarity(self, images: list[bytes], references: list[bytes]) -> list[ScorerResult]:
        pil = [decode_input(data, self.input_path) for data in images]
        refs = [decode_input(data, self.input_path) for data in references]
        try:
            outputs = await asyncio.to_thread(self.model.score, pil, refs)
        except Exception as exc:
            raise ScoringError(f"scorer 'consistency' failed: {exc}") from exc
        return [ScorerResult(raw=float(o.raw), score=float(o.score), truncated=False) for o in outputs]
