"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation").

Reference: the inference code in the README of github.com/yuvalkirstain/PickScore. A CLIP ViT-H/14 fine-tuned on
human preferences (yuvalkirstain/PickScore_v1) with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K;
text cut at 77 tokens; both embeddings L2-normalised.

raw   = logit_scale.exp() * cos(text_emb, image_emb)          (about 18-23 for generated images)
score = 100 * sigmoid(raw - reference)

PickScore was trained with a softmax over the raws of two images, so sigmoid(raw_a - raw_b) is the predicted
probability that people prefer a over b; score is that probability, in percent, against an image whose raw is
`reference` (default 20.0, a typical PickScore_v1 score). Change `reference` for other weights.

Images go through transformers' PIL image processor (bicubic resize, centre crop), as in the reference:
transformers 5 would otherwise pick its torchvision processor, whose resize differs slightly.
"""

from __future__ import annotations

import math
import os

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from .base import CLIP_CONTEXT_LENGTH, ScoreOutput, Scorer, features, resolve_device, resolve_dtype
from .hub import ImageProcessorPixels, from_pretrained, pil_image_processor_kwargs, trained_model
from .registry import defaults

DEFAULT_MODEL, DEFAULT_PROCESSOR, DEFAULT_REFERENCE = (defaults("pickscore")[k] for k in ("model", "processor", "reference"))


def normalise(raw: float, reference: float = DEFAULT_REFERENCE) -> float:
    """Preference probability, in percent, over an image whose PickScore is reference."""
    return 100.0 / (1.0 + math.exp(min(reference - raw, 700.0)))


class PickScore(ImageProcessorPixels, Scorer):
    name = "pickscore"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        processor: str | os.PathLike = DEFAULT_PROCESSOR,
        reference: float = DEFAULT_REFERENCE,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        allow_random_weights: bool = False,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.reference = float(reference)
        self.model = trained_model(CLIPModel.from_pretrained, model, "PickScore model", allow_random_weights)
        self.model.to(self.device, self.dtype).eval()
        self.tokenizer = from_pretrained(AutoTokenizer.from_pretrained, processor, "PickScore tokenizer", "processor")
        self.image_processor = from_pretrained(
            AutoImageProcessor.from_pretrained, processor, "PickScore image processor", "processor",
            **pil_image_processor_kwargs(),
        )
        self.max_tokens = min(CLIP_CONTEXT_LENGTH, self.model.config.text_config.max_position_embeddings)

    def _score(self, images: list[Image.Image], prompts: list[str]) -> list[ScoreOutput]:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False).input_ids]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        pixels = self.pixel_batch(images, self._pixels, self._tensor_pixels)
        image_emb = features(self.model.get_image_features(pixel_values=pixels)).float()
        text_emb = features(self.model.get_text_features(**text.to(self.device))).float()
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        raw = self.model.logit_scale.exp().float() * (text_emb * image_emb).sum(dim=-1)
        return [
            ScoreOutput(raw=r, score=normalise(r, self.reference), truncated=n > self.max_tokens)
            for r, n in zip(raw.tolist(), lengths)
        ]
