"""The scorers' options as typed settings: one pydantic model per scorer, the keyword arguments of
`scorers.load_scorer(name, **options)`.

Typed, and unknown keys refused naming the field, so a misspelt option fails when the config is
read instead of being ignored or failing inside a replica later. Defaults come from the scorer
registry (scorers.registry), where the scorer classes read theirs too. pipeline.settings gathers
these models into ScoringSettings, one field per registered scorer.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .base import DTYPE_NAMES
from .registry import defaults


def _path_to_str(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


ModelSource = Annotated[str, BeforeValidator(_path_to_str)]
OpenClipModel = Annotated[str | dict, BeforeValidator(_path_to_str)]


def check_dtype(value: str | None) -> str | None:
    """A dtype name of the scorers' table, or "auto"; None passes (the shared default applies)."""
    if value is not None and value.lower() not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {value!r}: use one of {', '.join(DTYPE_NAMES)}")
    return value


class ScorerOptions(BaseModel):
    """What every scorer takes. Only the options a config sets are passed on (options_for), so the
    offline models' paths are not overridden by defaults. `device` and `dtype` here override
    ScoringSettings' for this scorer alone."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(None, description="this scorer's device; default: scoring.device")
    dtype: str | None = Field(None, description="this scorer's dtype; default: scoring.dtype")
    allow_random_weights: bool = Field(
        False, description="load even where weights would be random (pretrained: null, an incomplete checkpoint): "
        "scores then mean nothing; for speed benchmarks only",
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        return check_dtype(value)


class OpenClipOptions(ScorerOptions):
    @model_validator(mode="after")
    def _trained_weights(self):
        """`pretrained: null` builds an untrained open_clip model, whose scores are noise: refuse
        it here, before any replica starts, unless the config asks for it in so many words."""
        bundled = isinstance(self.model, str) and self.model.startswith(("hf-hub:", "local-dir:"))
        if self.pretrained is None and not bundled and not self.allow_random_weights:
            raise ValueError(
                "pretrained is null, so the model would have random weights and meaningless scores: "
                "give a pretrained tag or a checkpoint file, or set allow_random_weights: true"
            )
        return self


_PICK, _CLIP, _VQA, _AES, _CON = (defaults(n) for n in ("pickscore", "clipscore", "vqascore", "aesthetic", "consistency"))


class PickScoreOptions(ScorerOptions):
    model: ModelSource = Field(_PICK["model"], description="Hugging Face id or local folder")
    processor: ModelSource = Field(_PICK["processor"], description="Hugging Face id or local folder")
    reference: float = Field(_PICK["reference"], description="the raw score that maps to 50")


class ClipScoreOptions(OpenClipOptions):
    model: OpenClipModel = Field(_CLIP["model"], description="open_clip architecture, config file/dict, hf-hub: or local-dir:")
    pretrained: ModelSource | None = Field(_CLIP["pretrained"], description="open_clip pretrained tag or checkpoint file")


class VQAScoreOptions(ScorerOptions):
    model: ModelSource = Field(_VQA["model"], description="Hugging Face id or local folder")
    processor: ModelSource | None = Field(_VQA["processor"], description="default: the model's own")
    question: str = Field(_VQA["question"], description="{} is the prompt")
    answer: str = Field(_VQA["answer"], min_length=1, description="one token of the model's tokenizer")

    @field_validator("question")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") != 1 or value.replace("{}", "").count("{") or value.replace("{}", "").count("}"):
            raise ValueError("question needs exactly one {} (where the prompt goes) and no other braces")
        return value


class AestheticOptions(OpenClipOptions):
    model: OpenClipModel = Field(_AES["model"], description="open_clip architecture, config file/dict, hf-hub: or local-dir:")
    pretrained: ModelSource | None = Field(_AES["pretrained"], description="open_clip pretrained tag or checkpoint file")
    head: ModelSource = Field(_AES["head"], description="the LAION MLP head file")


class ConsistencyOptions(ScorerOptions):
    model: ModelSource = Field(_CON["model"], description="Hugging Face id or local folder (a DINOv2 model)")
    processor: ModelSource | None = Field(_CON["processor"], description="default: the model's own")
