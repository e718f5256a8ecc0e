"""Settings for one generation service. Model ids and providers live here, never in code,
because image and chat models are retired every few months."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal
from urllib.parse import unquote, urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.costs import PricingSettings
from pipeline.providers.diffusers.settings import DiffusionSettings
from pipeline.storage.objectstore import is_url
from pipeline.schemas import DIMENSIONS
from scorers import SCORER_NAMES  # the text-image scorers, from the scorer registry (re-exported here)
from scorers import registry as scorer_registry
from scorers.base import DTYPE_NAMES
from scorers.options import (  # noqa: F401  (re-exported: the options' home before the registry)
    AestheticOptions,
    ClipScoreOptions,
    ConsistencyOptions,
    ModelSource,
    OpenClipModel,
    PickScoreOptions,
    VQAScoreOptions,
    check_dtype,
)

CONSISTENCY = "consistency"  # the image-image scorer: compares with reference images


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
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, a gateway).

    `gemini` is Google's OpenAI-compatible endpoint driven by the same client (docs/providers.md
    says why): unless set, its model, key variable, base_url and structured_output are the ones in
    PROVIDER_DEFAULTS."""

    PROVIDER_DEFAULTS: ClassVar[dict[str, dict[str, str]]] = {
        "gemini": {
            "model": "gemini-3.5-flash",
            "api_key_env": "GEMINI_API_KEY",
            "base_url": "https://generativelanguage.googleapis.com/v1beta/openai/",
            "structured_output": "json_object",
        },
    }

    provider: Literal["openai", "gemini", "offline"] = "openai"
    base_url: str | None = None
    model: str = "gpt-6-luna"  # gpt-4o-mini shuts down 2027-01-14 (docs/providers.md)
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float | None = Field(
        None, ge=0, le=2, description="sampling temperature; null sends none (the model's default): reasoning "
        "models such as the gpt-6 line refuse any other value",
    )
    timeout_s: float = Field(60.0, gt=0)
    invalid_output_retries: int = Field(2, ge=0, le=10)
    structured_output: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="json_schema: each request carries its reply's schema (strict structured "
        "outputs), so the model cannot answer another shape; json_object: JSON mode only, for endpoints without "
        "structured outputs (gemini's default). An endpoint that refuses json_schema with a 400 naming "
        "response_format is asked again in json_object mode, and the log and traces say so",
    )
    max_concurrency: int = Field(16, ge=1)
    accepts_images: bool | None = Field(
        None, description="the model reads images: the storyboard planner is shown the user's image "
        "to write the consistency sheet; false: the sheet comes from the prompt and the trace says so; "
        "null: true for openai, false for the offline agents (which read no images)",
    )
    retry: RetrySettings = RetrySettings()

    @model_validator(mode="after")
    def _provider_defaults(self) -> "LLMSettings":
        return _apply_provider_defaults(self)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env)

    def reads_images(self) -> bool:
        return self.accepts_images if self.accepts_images is not None else self.provider != "offline"


def _apply_provider_defaults(settings):
    """Fill the fields a config left unset with its provider's defaults, so `provider: gemini`
    alone is a working choice and an explicit value always wins."""
    for name, value in settings.PROVIDER_DEFAULTS.get(settings.provider, {}).items():
        if name not in settings.model_fields_set:
            object.__setattr__(settings, name, value)
    return settings


class ImageSettings(_Settings):
    """Image API: generate for a scene with no reference, edit with the reference otherwise.

    `gemini` (pipeline/providers/gemini.py, Google's own SDK) sends no size: it takes `aspect_ratio` (null:
    the ratio of `size`) and `image_size`; unless set, its model and key variable are the ones in
    PROVIDER_DEFAULTS (docs/providers.md: where the ids come from and when they were checked)."""

    PROVIDER_DEFAULTS: ClassVar[dict[str, dict[str, str]]] = {
        "gemini": {"model": "gemini-nano-banana-2.1", "api_key_env": "GEMINI_API_KEY"},
    }

    provider: Literal["openai", "gemini", "diffusers", "offline"] = "openai"
    base_url: str | None = None
    model: str = "gpt-image-2"  # gpt-image-1 shut down 2026-10-23 (docs/providers.md)
    size: str = Field("1536x1024", pattern=r"^\d+x\d+$", description="16:9-ish landscape by default")
    quality: str | None = "medium"
    aspect_ratio: str | None = Field(
        None, pattern=r"^\d+:\d+$", description="gemini: the output's aspect ratio, e.g. 16:9; null: the ratio of size"
    )
    image_size: str | None = Field(None, description="gemini: resolution tier (1K, 2K, 4K); null: the model's default")
    candidate_count: int = Field(
        1, ge=1, le=8, description="gemini: candidates per call; the first with an image is kept, the others' "
        "finish reasons are recorded (a blocked candidate then does not fail the variation)",
    )
    seed: int | None = Field(
        None, description="where the API takes a seed (gemini: best-effort), variation i sends seed + i; "
        "null: a random seed per variation, sent and recorded so the call can be repeated",
    )
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(120.0, gt=0)
    max_concurrency: int = Field(8, ge=1)
    retry: RetrySettings = RetrySettings()
    diffusion: DiffusionSettings = Field(
        DiffusionSettings(), description="provider diffusers: the self-hosted generator (model, scheduler, steps, seed)"
    )

    @model_validator(mode="after")
    def _provider_defaults(self) -> "ImageSettings":
        return _apply_provider_defaults(self)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env)

    @property
    def dimensions(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)


def _scorer_weight(entry) -> tuple:
    if entry.kind == scorer_registry.IMAGE_IMAGE:
        return (float, Field(entry.weight, ge=0, description=(
            f"{entry.name} (image against reference image) in selection; 0 keeps the guide's formula exact, "
            "above 0 the overall is renormalised by the sum of the weights")))
    return (float, Field(entry.weight, ge=0))


class ScorerWeights(create_model(
    "_ScorerWeightFields", __base__=_Settings, **{e.name: _scorer_weight(e) for e in scorer_registry.entries()}
)):
    """One weight per registered scorer, defaults from the scorer registry."""

    @model_validator(mode="after")
    def _positive_total(self) -> "ScorerWeights":
        if sum(self.as_dict().values()) <= 0:
            raise ValueError("scorer weights must not all be zero")
        return self

    def as_dict(self) -> dict[str, float]:
        """The text-image scorers' weights (what ScoringClient computes)."""
        return {name: getattr(self, name) for name in SCORER_NAMES}

    def selection(self) -> dict[str, float]:
        """All the weights, the image-image scorers (consistency) included."""
        return {name: getattr(self, name) for name in scorer_registry.names()}


class DimensionWeights(_Settings):
    """Agent 2's weights for the overall prompt score."""

    completeness: float = Field(0.25, ge=0)
    specificity: float = Field(0.25, ge=0)
    professionalism: float = Field(0.20, ge=0)
    cinematography: float = Field(0.15, ge=0)
    brand_alignment: float = Field(0.15, ge=0)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in DIMENSIONS}


DTYPES = DTYPE_NAMES  # the scorers' dtype table (scorers.base.DTYPES) and "auto"


class _ScoringSettings(_Settings):
    """The scorers' options, typed (scorers.options), plus the device and dtype they share.

    `text` is what the text-image scorers compare each variation with: `scene` (default) is the
    scene's storyboard prompt, its description and consistency markers, i.e. what the story
    needs; `enhanced` is the Cinematographer's rewrite, whose camera vocabulary is for the
    image model and overflows CLIP's 77 tokens (docs/scoring.md)."""

    weights: ScorerWeights = ScorerWeights()
    text: Literal["scene", "enhanced"] = "scene"
    input_path: Literal["pil", "tensor"] = Field(
        "pil",
        description=(
            "How image bytes reach the models. 'pil': decoded with Pillow and preprocessed by each "
            "model's reference (PIL) image processor on the host, exactly as the reference "
            "implementations. 'tensor': decoded once with torchvision (scorers.images.decode_tensor) and "
            "resized, cropped and normalised on the scorer's device (scorers.tensors), which takes that work "
            "off the host CPU on a GPU; scores deviate slightly from 'pil' (antialiased bicubic in float32, "
            "measured per scorer in docs/scoring.md, 'Input path: PIL (reference) and tensor (device)')."
        ),
    )
    device: str = "auto"
    dtype: str = "auto"

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return check_dtype(value)

    def options_for(self, name: str) -> dict:
        """load_scorer options: the ones the config sets, over the shared device and dtype."""
        options = getattr(self, name).model_dump(exclude_unset=True)
        for key in ("device", "dtype"):
            if options.get(key) is None:
                options[key] = getattr(self, key)
        return options


# One typed options field per registered scorer (scorers.options), after the shared fields; defaults
# from the scorer registry.
ScoringSettings = create_model(
    "ScoringSettings", __base__=_ScoringSettings, __module__=__name__, __doc__=_ScoringSettings.__doc__,
    **{e.name: (model, model()) for e in scorer_registry.entries() for model in [e.options_model()]},
)


def _location(value):
    """A store location: `s3://...` stays a URL string; a path, a plain string or a
    `file:///abs/path` URL becomes a Path, so code that joins local paths keeps working and
    `is_url(location)` tells a remote store from a directory."""
    if isinstance(value, str) and is_url(value):
        parsed = urlparse(value)
        return Path(unquote(parsed.path)) if parsed.scheme == "file" and parsed.netloc in ("", "localhost") else value
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ValueError("expected a path or a URL (file:///abs/path, s3://bucket/prefix)")


StoreLocation = Annotated[
    Path | str,
    PlainValidator(_location),
    PlainSerializer(str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "a path, file:///abs/path or s3://bucket/prefix"}),
]


class S3Settings(_Settings):
    """S3-compatible object storage, used where a location is `s3://bucket/prefix`.

    Credentials come from the environment variables named here (never from the config file);
    with neither set, boto3's own chain is used (instance roles, ~/.aws, web identity)."""

    endpoint_url: str | None = Field(
        None, description="e.g. http://seaweedfs:8333; else AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then AWS itself"
    )
    region: str | None = Field(None, description="else AWS_REGION / AWS_DEFAULT_REGION, then us-east-1")
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    session_token_env: str = "AWS_SESSION_TOKEN"
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="path for most self-hosted servers (SeaweedFS, MinIO) reached by IP or one host name"
    )
    create_bucket: bool = Field(
        False, description="create a missing bucket (tests, demos); else a missing one is an error"
    )
    max_connections: int = Field(32, ge=1, description="HTTP connection pool; worker threads share one client")
    outage_wait_s: float = Field(
        120.0, ge=0,
        description="how long a running generation waits for an S3 server that stopped answering, retrying "
        "its reads and writes with backoff, before it ends resumable; keep it above the job lease (lease_s)",
    )

    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def region_name(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def credentials(self) -> dict[str, str]:
        """Explicit keys for boto3, or {} to let boto3 find them itself."""
        key, secret = os.environ.get(self.access_key_env), os.environ.get(self.secret_key_env)
        if bool(key) != bool(secret):
            missing = self.secret_key_env if key else self.access_key_env
            both = f"{self.access_key_env} and {self.secret_key_env}"
            raise ValueError(f"S3 credentials: {missing} is not set (both {both} are needed)")
        if not key:
            return {}
        found = {"aws_access_key_id": key, "aws_secret_access_key": secret}
        if os.environ.get(self.session_token_env):
            found["aws_session_token"] = os.environ[self.session_token_env]
        return found


class TraceSettings(_Settings):
    root: StoreLocation = Field(
        Path("output/reference_image_traces"), description="a directory, file:///abs/path or s3://bucket/prefix"
    )
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


class StoryboardSettings(_Settings):
    markers: bool = Field(
        True, description="scene prompts carry the consistency sheet's markers verbatim and the agents must "
        "keep them; false plans the sheet but leaves the markers out (for comparisons)",
    )


class PipelineSettings(_Settings):
    llm: LLMSettings = LLMSettings()
    storyboard: StoryboardSettings = StoryboardSettings()
    images: ImageSettings = ImageSettings()
    scoring: ScoringSettings = ScoringSettings()
    enhancement: EnhancementSettings = EnhancementSettings()
    traces: TraceSettings = TraceSettings()
    artifacts_dir: StoreLocation = Field(
        Path("output/artifacts"), description="a directory, file:///abs/path or s3://bucket/prefix"
    )
    s3: S3Settings = S3Settings()
    # Cost: list prices per model id, for the cost shown in the status and traces.
    pricing: PricingSettings = Field(default_factory=PricingSettings, description="model id -> list prices (pipeline/costs.py)")

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
