"""Request, agent-output and result schemas shared by the CLI, the runner and the HTTP API.

Bounds follow the earlier system's public defaults (docs/serving.md, the API table), so its
clients keep working.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.costs import CostSummary, GenerationTiming, PlanningAccount, SceneTiming

PROMPT_MIN, PROMPT_MAX = 10, 2000
DURATION_MIN, DURATION_MAX = 9, 60
PROMPT_PATTERN = r"^[^\u0000-\u0008\u000e-\u001b\u007f-\u0084\u0086-\u009f]*$"
"""What the OpenAPI document says of a prompt: no control characters but whitespace
(`_invisible_controls`). The validator also refuses lone surrogates (no regex engine of a JSON
Schema validator takes them in a pattern) and wants ten visible characters, which no pattern
can say for all of Unicode; the 422 then names the rule."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def visible_text(text: str) -> str:
    """`text` as it shows on screen, whitespace collapsed: without controls, format characters
    (zero-width spaces and joiners), surrogates and unassigned code points, and without
    combining marks that have no visible character to sit on. Ten zero-width spaces are ten
    characters to a length check and nothing to the image model."""
    kept: list[str] = []
    for char in " ".join(text.split()):
        category = unicodedata.category(char)
        if category[0] == "C":
            continue
        if category[0] == "M" and (not kept or kept[-1] == " "):
            continue
        kept.append(char)
    return " ".join("".join(kept).split())


def _invisible_controls(text: str) -> set[str]:
    """Control characters other than whitespace (NUL cannot even be stored in PostgreSQL text),
    and surrogates (no UTF-8 encoding). Format characters such as ZWJ/ZWNJ are kept: emoji
    sequences and several scripts need them."""
    return {char for char in text if unicodedata.category(char) in ("Cc", "Cs") and not char.isspace()}


class GenerationRequest(BaseModel):
    """What a user asks for. Unknown fields are refused with their name (`extra="forbid"`): the
    guide's fields are all declared, so no client of the guide loses anything, while a
    misspelt option is no longer silently replaced by its default and megabytes of junk fields
    are not accepted into the job store."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=PROMPT_MIN, max_length=PROMPT_MAX, json_schema_extra={"pattern": PROMPT_PATTERN},
        description=f"at least {PROMPT_MIN} visible characters (zero-width and format characters do not count); "
        "no control characters but whitespace, no lone surrogates",
    )
    target_duration: int = Field(15, ge=DURATION_MIN, le=DURATION_MAX, description="seconds")
    use_advanced_image_generation: bool = Field(
        True, description="Accepted for compatibility; advanced generation is always on."
    )
    advanced_image_num_variations: int = Field(4, ge=2, le=8)
    advanced_image_max_enhancement_iterations: int = Field(4, ge=1, le=6)
    advanced_image_quality_threshold: float = Field(30.0, ge=0.0, le=100.0)

    @field_validator("target_duration", "advanced_image_num_variations", "advanced_image_max_enhancement_iterations",
                     "advanced_image_quality_threshold", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value):
        """`false` is not a threshold of 0: JSON booleans are refused where a number is declared."""
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value

    @field_validator("use_advanced_image_generation", mode="before")
    @classmethod
    def _booleans_are_booleans(cls, value):
        """`1` or `"yes"` is not `true`: what the document declares a boolean takes only one."""
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value

    @field_validator("prompt")
    @classmethod
    def _strip_prompt(cls, value: str) -> str:
        controls = _invisible_controls(value)
        if controls:
            names = ", ".join(sorted(f"U+{ord(c):04X}" for c in controls))
            raise ValueError(f"prompt must not contain control characters ({names})")
        if len(visible_text(value)) < PROMPT_MIN:
            raise ValueError(f"prompt must have at least {PROMPT_MIN} visible characters")
        stripped = " ".join(value.split())
        if len(stripped) < PROMPT_MIN:
            raise ValueError(f"prompt must have at least {PROMPT_MIN} non-blank characters")
        return stripped


# --- LLM structured outputs -------------------------------------------------------------


class PlannedScene(BaseModel):
    """One scene as the storyboard LLM writes it: its description, and the ids of the
    consistency markers it shows ("product", "setting", "style" or a character's name)."""

    description: str = Field(min_length=3, max_length=2000)
    markers: list[str] | None = Field(None, description="marker ids; None: every marker of the sheet")


class ProductSheet(BaseModel):
    """The product as every scene must show it."""

    name: str = Field(min_length=1, max_length=200)
    shape: str = Field("", max_length=300)
    colours: str = Field("", max_length=300)
    materials: str = Field("", max_length=300)
    logo_placement: str = Field("", max_length=300)


class CharacterSheet(BaseModel):
    """A recurring character's fixed physical description."""

    name: str = Field(min_length=1, max_length=100)
    age: str = Field("", max_length=100)
    hair: str = Field("", max_length=200)
    clothing: str = Field("", max_length=300)
    other: str = Field("", max_length=300)


class ConsistencySheet(BaseModel):
    """What must look the same in every scene (consistency). The pipeline turns each entry into
    one marker sentence (`pipeline.consistency.marker_texts`) that scene prompts carry
    verbatim. `source` says what it was written from: "prompt", "image" (the LLM saw the
    user's image) or "prompt-no-vision" (a user image was given but the configured model
    does not accept images)."""

    product: ProductSheet | None = None
    characters: list[CharacterSheet] = Field(default_factory=list, max_length=8)
    setting: str = Field("", max_length=400)
    style: str = Field("", max_length=400)
    # Set by the planner's code, not written by the LLM: readOnly keeps it out of the reply schema.
    source: str = Field("prompt", json_schema_extra={"readOnly": True})


class StoryboardOutput(BaseModel):
    scenes: list[PlannedScene] = Field(min_length=1)
    consistency: ConsistencySheet | None = None


class CinematographerOutput(BaseModel):
    enhanced_prompt: str = Field(min_length=10, max_length=4000)


DIMENSIONS = ("completeness", "specificity", "professionalism", "cinematography", "brand_alignment")


class DimensionScores(BaseModel):
    completeness: float = Field(ge=0, le=100)
    specificity: float = Field(ge=0, le=100)
    professionalism: float = Field(ge=0, le=100)
    cinematography: float = Field(ge=0, le=100)
    brand_alignment: float = Field(ge=0, le=100)


class PromptReview(BaseModel):
    """Agent 2's answer. Any overall score the LLM adds is ignored: we compute it ourselves."""

    model_config = ConfigDict(extra="ignore")

    scores: DimensionScores
    critique: str = Field(min_length=1, max_length=4000)
    improvements: list[str] = Field(default_factory=list, max_length=20)


# --- Results ------------------------------------------------------------------------------


class ScenePlan(BaseModel):
    """One planned scene. `prompt` is `description` followed by the scene's consistency
    `markers` verbatim (the scene's "original LLM prompt"); `sheet` is the generation's whole
    consistency sheet, carried by every scene so a checkpointed storyboard keeps it."""

    scene_number: int
    duration: int
    prompt: str
    description: str | None = None
    markers: list[str] = Field(default_factory=list)
    sheet: ConsistencySheet | None = None
    # Cost and time: the storyboard call's cost and time, on the first scene's plan only (it is stored
    # with the storyboard, so a resumed job keeps it); absent elsewhere.
    planning: PlanningAccount | None = Field(None, exclude_if=lambda value: value is None)


class IterationRecord(BaseModel):
    iteration: int
    enhanced_prompt: str
    scores: DimensionScores | None = None
    overall: float | None = None
    critique: str | None = None
    improvements: list[str] = Field(default_factory=list)
    error: str | None = None
    dropped_markers: list[str] = Field(default_factory=list)
    timestamp: str = Field(default_factory=utcnow)


class EnhancementResult(BaseModel):
    original_prompt: str
    final_prompt: str
    initial_scores: DimensionScores | None
    initial_overall: float | None
    final_scores: DimensionScores | None
    final_overall: float | None
    total_iterations: int
    approved: bool
    stop_reason: str
    iterations: list[IterationRecord]


class ScorerResult(BaseModel):
    raw: float
    score: float = Field(ge=0, le=100)
    truncated: bool = False


class ReferenceSimilarity(BaseModel):
    """The consistency model's result for one reference image: `roles` says which reference
    it is ("previous" scene, "first" scene; both for scene 2)."""

    scene_number: int
    roles: list[str]
    raw: float
    score: float = Field(ge=0, le=100)


class ConsistencyScore(BaseModel):
    """Cross-scene consistency of one variation: the mean over its references."""

    raw: float
    score: float = Field(ge=0, le=100)
    references: list[ReferenceSimilarity]


class VariationResult(BaseModel):
    variation: int
    image_key: str | None = None
    scores: dict[str, ScorerResult] = Field(default_factory=dict)
    consistency: ConsistencyScore | None = None
    overall: float | None = None
    rank: int | None = None
    provider_metadata: dict = Field(default_factory=dict)
    error: str | None = None


class SceneResult(BaseModel):
    scene_number: int
    duration: int
    original_prompt: str
    enhanced_prompt: str
    prompt_score: float | None = None
    reference_image_key: str
    reference_image_url: str | None = None
    quality_score: float | None = None
    consistency_score: float | None = None
    below_threshold: bool = False
    user_provided: bool = False
    selected_variation: int | None = None
    variations: list[VariationResult] = Field(default_factory=list)
    completed_at: str = Field(default_factory=utcnow)
    # Cost and time: this scene's provider calls priced (enhancement and its images) and its stage times.
    cost: CostSummary | None = None
    timing: SceneTiming | None = None


class AdvancedImageSettings(BaseModel):
    quality_threshold: float
    num_variations: int
    max_enhancement_iterations: int


class StoryboardPlan(BaseModel):
    # The guide's example has the flag here as well as at the top level of the status.
    advanced_image_generation_used: bool = True
    advanced_image_settings: AdvancedImageSettings
    scenes: list[dict]
    # Additive (consistency), not in the guide: absent (not null) when the plan has no sheet, so a
    # plan without one keeps exactly the guide's keys.
    consistency_sheet: ConsistencySheet | None = Field(None, exclude_if=lambda sheet: sheet is None)


Status = Literal["queued", "running", "completed", "failed", "cancelled"]


class GenerationStatus(BaseModel):
    """The guide's status shape, shared by `sceneref generate --json` and GET /api/status."""

    generation_id: str
    status: Status
    progress: int = Field(ge=0, le=100)
    advanced_image_generation_used: bool = True
    storyboard_plan: StoryboardPlan
    error: str | None = None
    offline: bool = False
    # Additive (cost and time): the generation's estimated cost (planning and every finished scene;
    # usd null when a model has no price) and its time per stage.
    cost: CostSummary | None = None
    timing: GenerationTiming | None = None
