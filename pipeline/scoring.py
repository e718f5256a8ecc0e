"""Combining the four quality scores, ranking and selection.

The pipeline sees scorers only through `ScoringClient`: in one process it is `LocalScoring`
over models from `scorers.load_scorer`; under Ray Serve it is an adapter over deployment
handles. Either way a scorer that cannot run raises: no made-up scores.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

from PIL import Image

from pipeline.schemas import ScorerResult, VariationResult
from scorers.images import SCORER_INPUT, open_image


class ScoringError(RuntimeError):
    pass


class ScoringClient(Protocol):
    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        """Per image, each scorer's result keyed by scorer name."""


class ScoreModel(Protocol):
    """What `scorers.load_scorer` returns: raw score, 0-100 score, truncation flag per image."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> Sequence: ...


def weighted_overall(scores: dict[str, ScorerResult], weights: dict[str, float]) -> float:
    """sum(w_i * s_i) / sum(w_i) over scorers with a positive weight (0.50/0.25/0.15/0.10
    by default, which already sum to one)."""
    active = {name: w for name, w in weights.items() if w > 0}
    missing = [name for name in active if name not in scores]
    if missing:
        raise ScoringError(f"missing scores from {', '.join(missing)}")
    return round(sum(scores[name].score * w for name, w in active.items()) / sum(active.values()), 4)


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


class LocalScoring:
    """In-process scoring: each model scores the whole batch in a worker thread, so the
    event loop (and the other variations' I/O) keeps going while torch computes."""

    def __init__(self, models: dict[str, ScoreModel], weights: dict[str, float]):
        self.models = {name: model for name, model in models.items() if weights.get(name, 0) > 0}

    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        pil = [decode_rgb(data) for data in images]
        results: list[dict[str, ScorerResult]] = [{} for _ in images]
        for name, model in self.models.items():
            try:
                outputs = await asyncio.to_thread(model.score, pil, prompts)
            except Exception as exc:
                raise ScoringError(f"scorer {name!r} failed: {exc}") from exc
            for slot, out in zip(results, outputs):
                slot[name] = ScorerResult(raw=float(out.raw), score=float(out.score), truncated=bool(out.truncated))
        return results
