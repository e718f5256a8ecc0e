"""CLIP-Score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning").

Reference: clipscore.py of github.com/jmhessel/clipscore. The image and the text "A photo depicts " + prompt
are embedded by CLIP ViT-B/32 (OpenAI weights), both L2-normalised, and CLIP-S = 2.5 * max(cos, 0).

raw   = cos(image_emb, text_emb)
score = 100 * clamp(2.5 * cos, 0, 1)   (CLIP-S capped at 1: cosines above 0.4 are rare in practice)

The default architecture is ViT-B-32-quickgelu: OpenAI's weights were trained with QuickGELU, and open_clip's
plain ViT-B-32 builds GELU, which loads the same weights without error and silently changes every score.
"""

from __future__ import annotations

import os
from functools import cached_property

import torch
from PIL import Image

from .base import ScoreOutput, Scorer, clamp01, resolve_device, resolve_dtype
from .openclip import load_open_clip
from .registry import defaults
from .tensors import CropTransform

DEFAULT_MODEL, DEFAULT_PRETRAINED = defaults("clipscore")["model"], defaults("clipscore")["pretrained"]
PREFIX = "A photo depicts "
WEIGHT = 2.5


def normalise(cos: float) -> float:
    """CLIP-S = 2.5 * max(cos, 0) on 0-100, capped at CLIP-S = 1."""
    return 100.0 * clamp01(WEIGHT * cos)


class ClipScore(Scorer):
    name = "clipscore"

    def __init__(
        self,
        model: str | os.PathLike | dict = DEFAULT_MODEL,
        pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        allow_random_weights: bool = False,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.clip = load_open_clip(model, pretrained, self.device, self.dtype, allow_random_weights)

    @cached_property
    def tensor_transform(self) -> CropTransform:
        """The tensor path's preprocessing, read from open_clip's own preprocess transform."""
        return CropTransform.from_open_clip(self.clip.preprocess)

    def _score(self, images: list[Image.Image], prompts: list[str]) -> list[ScoreOutput]:
        texts = [PREFIX + prompt for prompt in prompts]
        truncated = [len(self.clip.tokenizer.encode(text)) + 2 > self.clip.context_length for text in texts]
        pixels = self.pixel_batch(images, self.clip.preprocess, self.tensor_transform, join=torch.stack)
        image_emb = self.clip.model.encode_image(pixels).float()
        text_emb = self.clip.model.encode_text(self.clip.tokenizer(texts).to(self.device)).float()
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        cos = (image_emb * text_emb).sum(dim=-1).tolist()
        return [ScoreOutput(raw=c, score=normalise(c), truncated=t) for c, t in zip(cos, truncated)]
