"""The self-hosted generator's settings, apart from its engine so that `pipeline.settings`
and the model loader read them without importing the engine (and torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DiffusionSettings(BaseModel):
    """The self-hosted generator: which pipeline, how it samples, how the replica batches.

    Defaults fit SDXL-Turbo (docs/deploy.md, "Self-hosted generator", lists the settings for
    SD 1.5 and FLUX.1-schnell)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("stabilityai/sdxl-turbo", description="Hugging Face id, or a folder saved with save_pretrained")
    revision: str | None = Field(None, description="hub revision (a commit pins the weights)")
    variant: str | None = Field(None, description='weight-file variant, e.g. "fp16": half the download and disk')
    scheduler: str | None = Field(
        None, description="a class name in diffusers.schedulers built from the model's scheduler config; null keeps "
        "the model's own",
    )
    steps: int = Field(4, ge=1, le=200, description="denoising steps (image-to-image runs steps x strength of them)")
    guidance_scale: float = Field(0.0, ge=0, le=30, description="classifier-free guidance; 0 for distilled models")
    strength: float = Field(
        0.5, gt=0, le=1, description="image-to-image: how far from the reference (1: ignore it, near 0: copy it)"
    )
    size: str = Field("1024x576", pattern=r"^\d+x\d+$", description="width x height, multiples of 16; 16:9 by default")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on a GPU, float32 on CPU; FLUX wants bfloat16"
    )
    device: str = Field("auto", description="auto: cuda when there is a GPU, else cpu")
    seed: int | None = Field(
        None, ge=0, description="variation i gets seed + i; null: a fresh random seed per image, recorded in its "
        "metadata so the image can be made again",
    )
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="text tokens for T5-encoded models (FLUX.1-schnell: 256); null: the pipeline's "
        "default; a pipeline that does not take it (SD, SDXL: CLIP's 77) is refused at load",
    )
    max_batch_size: int = Field(4, ge=1, le=64, description="images per pipeline call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=5, description="how long a replica waits to fill a batch")
    health_check_cache_s: float = Field(
        10.0, ge=0, le=300, description="a generation that succeeded this recently proves the replica healthy"
    )
    allow_random_weights: bool = Field(
        False, description="load a checkpoint that lacks weights (they would be random): never in production"
    )

    @field_validator("size")
    @classmethod
    def _multiple_of_16(cls, size: str) -> str:
        # SD and SDXL need multiples of 8, FLUX of 16 (it packs 2x2 latents); other sizes are
        # silently rounded by some pipelines, so the output would not be the size asked for.
        if any(int(side) % 16 or int(side) == 0 for side in size.split("x")):
            raise ValueError(f"size {size}: width and height must be positive multiples of 16")
        return size

    @model_validator(mode="after")
    def _img2img_runs_a_step(self) -> "DiffusionSettings":
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps x strength = {self.steps} x {self.strength} runs no image-to-image step; raise either"
            )
        return self

    @property
    def dimensions(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)
