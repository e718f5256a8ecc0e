"""The quality scorers of sceneref, as a plain library (no Ray): four text-image scorers and the
image-image consistency scorer.

    scorer = load_scorer("clipscore", device="auto", dtype="auto")
    [out] = scorer.score([image], ["a red bicycle against a brick wall"])
    out.raw, out.score, out.truncated

    consistency = load_scorer("consistency")          # image-image: one reference per image
    [out] = consistency.score([image], [previous_scene_image])

Formulas, sources and normalisations: docs/scoring.md and each scorer's module.
"""

from __future__ import annotations

from typing import Any

from .base import ModelNotFoundError, RandomWeightsError, ScoreOutput, Scorer
from .images import ImageError, open_image, to_rgb

from . import registry

SCORER_NAMES = registry.names(registry.TEXT_IMAGE)  # score(images, prompts)
IMAGE_SCORER_NAMES = registry.names(registry.IMAGE_IMAGE)  # score(images, references)


def load_scorer(name: str, **options: Any) -> Scorer:
    """Load a scorer by name with its options (model ids or local paths, device, dtype; see each class).

    The names, classes and default options are the scorer registry's (scorers.registry):
    pickscore: model, processor, reference, device, dtype       (scorers.pickscore.PickScore)
    clipscore: model, pretrained, device, dtype                  (scorers.clipscore.ClipScore)
    vqascore:  model, processor, question, answer, device, dtype (scorers.vqascore.VQAScore)
    aesthetic: model, pretrained, head, device, dtype            (scorers.aesthetic.Aesthetic)
    consistency: model, processor, device, dtype                 (scorers.consistency.Consistency)

    Every scorer also takes allow_random_weights (default False): without it, a model that would have random
    weights (open_clip pretrained=None, a checkpoint that lacks some weights) raises RandomWeightsError.
    """
    return registry.get(name).load_class()(**options)


__all__ = [
    "IMAGE_SCORER_NAMES", "SCORER_NAMES", "ImageError", "ModelNotFoundError", "RandomWeightsError", "ScoreOutput", "Scorer", "load_scorer", "open_image", "to_rgb",
]
