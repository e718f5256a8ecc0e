"""Settings for one generation service. Model ids and providers live here, never in code,
because image and chat models are retired every few months."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.schemas import DIMENSIONS

SCORER_NAMES = ("pickscore", "clipscore", "vqascore", "aesthetic")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySettings(_Settings):
    """Transient errors (429, 5xx, timeouts) are retried with exponential backoff;
    a server's Retry-After wins when it is given (capped at `max_delay_s`)."""

    max_attempts: int = Field(4, ge=1, le=20)
    initial_delay_s: float = Field(0.5, ge=0)
    max_delay_s: float = Field(30.0, ge=0)
    multiplier: float = Field(2.0, ge=1)


class LLMSettings(_Settings):
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, a gateway)."""

    provider: Literal["openai", "offline"] = "openai"
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(0.7, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)
    invalid_output_retries: int = Field(2, ge=0, le=10)
    max_concurrency: int = Field(16, ge=1)
    retry: RetrySettings = RetrySettings()

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env)


class ImageSettings(_Settings):
    """Image API: generate for a scene with no reference, edit with the reference otherwise."""

    provider: Literal["openai", "offline"] = "openai"
    base_url: str | None = None
    model: str = "gpt-image-1"
    size: str = Field("1536x1024", pattern=r"^\d+x\d+$", description="16:9-ish landscape by default")
    quality: str | None = "medium"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(120.0, gt=0)
    max_concurrency: int = Field(8, ge=1)
    retry: RetrySettings = RetrySettings()

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env)

    @property
    def dimensions(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)


class ScorerWeights(_Settings):
    pickscore: float = Field(0.50, ge=0)
    clipscore: float = Field(0.25, ge=0)
    vqascore: float = Field(0.15, ge=0)
    aesthetic: float = Field(0.10, ge=0)

    @model_validator(mode="after")
    def _positive_total(self) -> "ScorerWeights":
        if sum(self.as_dict().values()) <= 0:
            raise ValueError("scorer weights must not all be zero")
        return self

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SCORER_NAMES}


class DimensionWeights(_Settings):
    """Agent 2's weights for the overall prompt score."""

    completeness: float = Field(0.25, ge=0)
    specificity: float = Field(0.25, ge=0)
    professionalism: float = Field(0.20, ge=0)
    cinematography: float = Field(0.15, ge=0)
    brand_alignment: float = Field(0.15, ge=0)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in DIMENSIONS}


class ScoringSettings(_Settings):
    """Per-scorer dicts are the options of `scorers.load_scorer(name, **options)`."""

    weights: ScorerWeights = ScorerWeights()
    device: str = "auto"
    dtype: str = "auto"
    pickscore: dict = Field(default_factory=dict)
    clipscore: dict = Field(default_factory=dict)
    vqascore: dict = Field(default_factory=dict)
    aesthetic: dict = Field(default_factory=dict)

    def options_for(self, name: str) -> dict:
        return {"device": self.device, "dtype": self.dtype, **getattr(self, name)}


class TraceSettings(_Settings):
    root: Path = Path("output/reference_image_traces")
    keep: bool = Field(False, description="Keep trace files after the generation completes.")


class EnhancementSettings(_Settings):
    approval_score: float = Field(85.0, ge=0, le=100)
    weights: DimensionWeights = DimensionWeights()

    @field_validator("weights")
    @classmethod
    def _weights_sum(cls, weights: DimensionWeights) -> DimensionWeights:
        if sum(weights.as_dict().values()) <= 0:
            raise ValueError("dimension weights must not all be zero")
        return weights


class PipelineSettings(_Settings):
    llm: LLMSettings = LLMSettings()
    images: ImageSettings = ImageSettings()
    scoring: ScoringSettings = ScoringSettings()
    enhancement: EnhancementSettings = EnhancementSettings()
    traces: TraceSettings = TraceSettings()
    artifacts_dir: Path = Path("output/artifacts")

    @classmethod
    def offline(cls, output: Path = Path("output"), **overrides) -> "PipelineSettings":
        """Offline provider pair: no key, no network."""
        base = cls(
            llm=LLMSettings(provider="offline", model="offline-agents"),
            images=ImageSettings(provider="offline", model="offline-procedural", size="512x288"),
            traces=TraceSettings(root=output / "reference_image_traces"),
            artifacts_dir=output / "artifacts",
        )
        return base.model_copy(update=overrides)
