"""A tiny Stable-Diffusion-shaped pipeline with random weights, built from configs with the real
classes and saved with save_pretrained, so CPU tests and the offline config load it through the
same code as a real checkpoint (pipeline.providers.diffusers.loading.load_pipelines). Its images are noise; the
folder carries a RANDOM_WEIGHTS marker so the engine records that in every image's metadata.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

RANDOM_WEIGHTS = "RANDOM_WEIGHTS"
"""Marker file in a pipeline folder whose weights are random on purpose (tests, offline demo)."""


def build_tiny_pipeline(target: Path) -> Path:
    """Build the tiny pipeline at `target` once (later calls reuse it) and return the folder.

    Built in a temporary sibling and renamed into place whole, so a concurrent builder or an
    interrupted build never leaves a half-written pipeline that loads."""
    target = Path(target)
    if (target / RANDOM_WEIGHTS).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _build(work)
        (work / RANDOM_WEIGHTS).write_text("random weights on purpose: pipeline.providers.diffusers.tiny (tests, offline demo)\n")
        if target.exists() and not (target / RANDOM_WEIGHTS).exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(work, target)
        except OSError:
            if not (target / RANDOM_WEIGHTS).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _build(directory: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from scorers.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(directory / "tokenizer")  # the real CLIP BPE, offline
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion 1.5's own schedule values, so the scheduler behaves like the real one.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
