"""What a generation cost and how long it took: per provider call, per scene, per generation.

Every chat call reports its tokens and every image call its image (and tokens where the API
says) as a `CallUsage`; `price` turns one into dollars from `PricingSettings`, a table in the
settings because prices change as often as model ids. A model that is not in the table costs
"unknown" (`usd: null`, `unknown: true`, the model named), never 0: an estimate that silently
drops the calls it cannot price would look cheaper than the bill. The offline providers report
plausible token counts with provider "offline" and cost exactly 0.

Figures are estimates from list prices: discounts, cached-input prices, and calls that failed
and were not retried into a success (billed by some vendors) are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.telemetry import collect, hooks

STAGES = ("planning", "enhancement", "generation", "scoring")


class ModelPrice(BaseModel):
    """One model's list prices in USD. Token prices are per 1M tokens; `per_image` maps a
    size/quality to a price per image: keys are tried as "SIZE/QUALITY" (e.g. "1536x1024/medium"),
    "SIZE", the Gemini resolution tier ("1K", "2K", "4K"), then "*"."""

    model_config = ConfigDict(extra="forbid")

    input_per_1m: float | None = Field(None, ge=0, description="USD per 1M input (prompt) tokens")
    output_per_1m: float | None = Field(None, ge=0, description="USD per 1M output tokens")
    per_image: dict[str, float] = Field(default_factory=dict, description="USD per image by size/quality")


# List prices as docs/providers.md records them (checked 2026-11-26); change them in the config.
# gpt-image-2 is token-billed: its text input is priced like its image input here (an upper bound).
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-6-luna": ModelPrice(input_per_1m=0.10, output_per_1m=0.50),
    "gpt-image-2": ModelPrice(input_per_1m=8.0, output_per_1m=30.0),
    "gemini-nano-banana-2.1": ModelPrice(output_per_1m=30.0, per_image={"1K": 0.0336, "4K": 0.1134}),
    "gemini-3-pro-image": ModelPrice(per_image={"1K": 0.134, "2K": 0.134, "4K": 0.24}),
}


class PricingSettings(BaseModel):
    """`pipeline.pricing` in the settings: model id -> list prices."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="model id -> prices; a model missing here costs 'unknown' (null), never 0",
    )


class CallUsage(BaseModel):
    """One provider call as the accounting sees it. Token counts are None where the provider
    did not say; `images` is 1 for an image call."""

    kind: Literal["chat", "image"]
    stage: str = "enhancement"
    provider: str
    model: str
    task: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    images: int = 0
    size: str | None = None
    quality: str | None = None
    # Chat calls: how the reply was constrained ("json_schema" or "json_object"), and the
    # endpoint's refusal where it would not take json_schema; the traces show both.
    response_format: str | None = None
    response_format_fallback: str | None = None


def price(usage: CallUsage, pricing: PricingSettings) -> float | None:
    """USD for one call, or None when the table cannot price it (the model is unknown, or the
    call lacks what its price needs: token counts for a token-priced chat model, a size for a
    per-image price)."""
    if usage.provider == "offline":
        return 0.0
    prices = pricing.models.get(usage.model)
    if prices is None:
        return None
    if usage.kind == "chat":
        return _token_price(usage, prices)
    by_tokens = _token_price(usage, prices) if usage.output_tokens else None
    if by_tokens is not None:
        return by_tokens
    for key in (f"{usage.size}/{usage.quality}", usage.size, "*"):
        if key and key in prices.per_image:
            return prices.per_image[key] * usage.images
    return None


def _token_price(usage: CallUsage, prices: ModelPrice) -> float | None:
    total = 0.0
    for tokens, rate in ((usage.input_tokens, prices.input_per_1m), (usage.output_tokens, prices.output_per_1m)):
        if tokens is None or (tokens and rate is None):
            return None
        total += tokens * (rate or 0.0) / 1_000_000
    return total


def image_usage(metadata: dict, stage: str = "generation") -> CallUsage:
    """The accounting record of one received image, from the metadata its provider returned
    (OpenAI's `usage.input_tokens/output_tokens`, Gemini's `usage.prompt_tokens/output_tokens`,
    Gemini's `image_size` tier standing in for a pixel size)."""
    usage = metadata.get("usage") or {}
    return CallUsage(
        kind="image",
        stage=stage,
        provider=str(metadata.get("provider") or "unknown"),
        model=str(metadata.get("model") or "unknown"),
        input_tokens=usage.get("input_tokens", usage.get("prompt_tokens")),
        output_tokens=usage.get("output_tokens"),
        images=1,
        size=metadata.get("size") or metadata.get("image_size") or ("1K" if metadata.get("provider") == "gemini" else None),
        quality=metadata.get("quality"),
    )


def estimate_tokens(text: str) -> int:
    """A plausible token count for text no tokenizer has seen (the offline agents): about four
    characters a token, as for English with OpenAI's tokenizers."""
    return max(1, round(len(text) / 4))


class CostSummary(BaseModel):
    """What a set of calls cost. `usd` is None ("unknown") as soon as one call could not be
    priced; `priced_usd` is what the priced ones add up to, and `unpriced_models` names the
    models to add to `pipeline.pricing`."""

    usd: float | None = 0.0
    unknown: bool = False
    priced_usd: float = 0.0
    unpriced_models: list[str] = Field(default_factory=list)
    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    by_stage: dict[str, float | None] = Field(default_factory=dict, description="USD per stage; null: unknown")


def summarize(calls: Iterable[CallUsage], pricing: PricingSettings) -> CostSummary:
    summary = CostSummary()
    for call in calls:
        cost = price(call, pricing)
        summary.llm_calls += call.kind == "chat"
        summary.input_tokens += call.input_tokens or 0
        summary.output_tokens += call.output_tokens or 0
        summary.images += call.images
        stage = summary.by_stage.get(call.stage, 0.0)
        if cost is None:
            summary.unknown = True
            if call.model not in summary.unpriced_models:
                summary.unpriced_models.append(call.model)
            summary.by_stage[call.stage] = None
        else:
            summary.priced_usd += cost
            summary.by_stage[call.stage] = None if stage is None else stage + cost
    return _settle(summary)


def combine(summaries: Iterable[CostSummary | None]) -> CostSummary:
    """The sum of several summaries (a generation's scenes and its planning)."""
    total = CostSummary()
    for part in summaries:
        if part is None:
            continue
        total.unknown |= part.unknown
        total.priced_usd += part.priced_usd
        total.unpriced_models += [m for m in part.unpriced_models if m not in total.unpriced_models]
        total.llm_calls += part.llm_calls
        total.input_tokens += part.input_tokens
        total.output_tokens += part.output_tokens
        total.images += part.images
        for stage, usd in part.by_stage.items():
            before = total.by_stage.get(stage, 0.0)
            total.by_stage[stage] = None if before is None or usd is None else before + usd
    return _settle(total)


def _settle(summary: CostSummary) -> CostSummary:
    summary.priced_usd = round(summary.priced_usd, 6)
    summary.usd = None if summary.unknown else summary.priced_usd
    summary.by_stage = {k: (None if v is None else round(v, 6)) for k, v in summary.by_stage.items()}
    return summary


class SceneTiming(BaseModel):
    """Seconds a scene spent in each stage. Scenes are enhanced concurrently, so the
    enhancement times of a generation's scenes overlap; generation and scoring run scene after
    scene (chained)."""

    enhancement_s: float | None = None
    generation_s: float | None = None
    scoring_s: float | None = None
    total_s: float = 0.0


class PlanningAccount(BaseModel):
    """The storyboard call's cost and time: generation-level, so it is stored with the
    storyboard (on its first scene's plan) and counted once in the generation's total."""

    cost: CostSummary
    seconds: float


class GenerationTiming(BaseModel):
    """A generation's time per stage: planning, then each stage summed over its scenes;
    `elapsed_s` is wall-clock time from submission (queue wait included) to the end, or to
    now while it runs."""

    planning_s: float | None = None
    enhancement_s: float = 0.0
    generation_s: float = 0.0
    scoring_s: float = 0.0
    scenes_timed: int = 0
    elapsed_s: float | None = None


def generation_timing(planning: PlanningAccount | None, scenes: Iterable[SceneTiming | None], elapsed_s: float | None) -> GenerationTiming:
    timing = GenerationTiming(planning_s=planning.seconds if planning else None, elapsed_s=elapsed_s)
    for scene in scenes:
        if scene is None:
            continue
        timing.scenes_timed += 1
        timing.enhancement_s += scene.enhancement_s or 0.0
        timing.generation_s += scene.generation_s or 0.0
        timing.scoring_s += scene.scoring_s or 0.0
    for name in ("enhancement_s", "generation_s", "scoring_s"):
        setattr(timing, name, round(getattr(timing, name), 3))
    return timing


class Meter:
    """One scene's (or the storyboard's) bill and clock while it runs: `stage(name)` times a
    block and collects the provider calls made in it (`pipeline.telemetry.collect`), `add`
    takes calls known otherwise (images, from their metadata). `close` prices them, reports
    them to the telemetry hooks once, and returns what the scene stores."""

    def __init__(self) -> None:
        self.calls: list[CallUsage] = []
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with collect() as calls:
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.add(calls, stage=name)

    def add(self, calls: Iterable[CallUsage], *, stage: str) -> None:
        self.calls += [call.model_copy(update={"stage": stage}) for call in calls]

    def close(self, pricing: PricingSettings) -> tuple[CostSummary, SceneTiming]:
        cost = summarize(self.calls, pricing)
        timing = SceneTiming(**{f"{k}_s": round(v, 3) for k, v in self.seconds.items() if k != "planning"})
        timing.total_s = round(sum(self.seconds.values()), 3)
        sink = hooks()
        for stage, seconds in self.seconds.items():
            sink.stage_seconds(stage, seconds)
            if any(call.stage == stage for call in self.calls):
                sink.cost(stage, cost.by_stage.get(stage))
        for call in self.calls:
            if call.input_tokens or call.output_tokens:
                sink.usage(call.kind, call.model, call.input_tokens or 0, call.output_tokens or 0)
        return cost, timing

    def planning(self, pricing: PricingSettings) -> PlanningAccount:
        cost, timing = self.close(pricing)
        return PlanningAccount(cost=cost, seconds=timing.total_s)
