"""Cross-scene consistency: how much a generated image looks like a reference image.

Image-image, unlike the four text-image scorers: score(images, references) compares images[i]
with references[i], pair by pair. The embedding is DINOv2's (Oquab et al. 2023) through
transformers' Dinov2Model: the final layer-normed CLS token (`pooler_output`), the feature
self-supervised ViTs are compared with in subject-fidelity metrics (DreamBooth's "DINO" score,
Ruiz et al. 2023, uses the cosine of DINO ViT-S/16 CLS embeddings of generated and real
images). DINO features separate instances of the same class (two different people, two
bottles) better than CLIP's, which tend to match anything of the same kind.

raw   = cos(emb(image), emb(reference))
score = 100 * clamp(raw, 0, 1)

A negative cosine (unrelated images can land slightly below 0) maps to 0. The preprocessing is
the model's own image processor (for DINOv2: shortest edge 256 bicubic, centre crop 224,
ImageNet mean and std), its PIL version as for the other scorers. Nothing is cut:
`truncated` is always False.
"""

from __future__ import annotations

import os

import torch
from PIL import Image
from transformers import AutoImageProcessor, Dinov2Model

from .base import ScoreOutput, Scorer, as_input, clamp01, resolve_device, resolve_dtype
from .hub import ImageProcessorPixels, from_pretrained, pil_image_processor_kwargs, trained_model
from .registry import defaults

DEFAULT_MODEL = defaults("consistency")["model"]


def normalise(cos: float) -> float:
    """Cosine similarity in percent, negatives at 0."""
    return 100.0 * clamp01(cos)


class Consistency(ImageProcessorPixels, Scorer):
    name = "consistency"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        processor: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        allow_random_weights: bool = False,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = trained_model(Dinov2Model.from_pretrained, model, "consistency model", allow_random_weights)
        self.model.to(self.device, self.dtype).eval()
        self.image_processor = from_pretrained(
            AutoImageProcessor.from_pretrained, processor or model, "consistency image processor",
            "processor" if processor else "model", **pil_image_processor_kwargs(),
        )

    def score(self, images, references) -> list[ScoreOutput]:  # type: ignore[override]
        """Compare images[i] with references[i] (PIL images of any mode, RGB inside, or uint8 RGB
        (3, H, W) tensors preprocessed on this scorer's device; both may be mixed)."""
        if len(images) != len(references):
            raise ValueError(f"{len(images)} images but {len(references)} references: give one reference per image")
        if not images:
            return []
        with torch.inference_mode():
            return self._score([as_input(i) for i in images], [as_input(r) for r in references])

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised CLS embeddings, fp32."""
        pixels = self.pixel_batch(images, self._pixels, self._tensor_pixels)
        emb = self.model(pixel_values=pixels).pooler_output.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def _score(self, images: list[Image.Image], references: list[Image.Image]) -> list[ScoreOutput]:  # type: ignore[override]
        emb = self.embed(images + references)
        cos = (emb[: len(images)] * emb[len(images):]).sum(dim=-1).tolist()
        return [ScoreOutput(raw=c, score=normalise(c), truncated=False) for c in cos]
