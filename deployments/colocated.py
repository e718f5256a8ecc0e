"""The co-located scoring layout: one deployment, named Scoring, holding the four text-image
models on one device (`args.scorers.layout: colocated`).

Each image is sent once (one request, not four), decoded once and scored by every model in
the same pass; the replica owns its device, or on a CPU machine its cores, instead of four
processes competing for them. The separate layout (one deployment per model, each on its own
GPU fraction) scales each model on its own; which fits which cluster is measured in
docs/benchmarks.md and summed up in docs/serving.md. The consistency model (image pairs, not
prompts) is held here too, so the image is decoded once for all five models; its embeddings are
kept per replica (`scorers.ensemble.EmbeddingCache`).

The engine is `scorers.ensemble.Ensemble` (no Serve in it); this module is the Serve layer:
batching and coalescing, health and figures, shared with the separate layout through
`deployments.scorer.ScoringReplica`.
"""

from __future__ import annotations

import time

from pydantic import Field, field_validator
from ray import serve

import scorers
from deployments.scorer import (
    BatchConfig, ImagePair, ScorerServing, ScoringReplica, content_key, load_model, probe_image,
    scorer_deployment_options,
)
from pipeline.telemetry import hooks
from scorers.ensemble import EmbeddingCache, Ensemble


class ColocatedBatchConfig(BatchConfig):
    """The Scoring replica's `user_config`: the request batch (images per pass) and, per model,
    the most images one forward pass of that model takes; `serve deploy` changes both without
    reloading the models."""

    model_max_batch_size: dict[str, int] = Field(
        default_factory=dict,
        description="per model (pickscore, clipscore, vqascore, aesthetic): at most this many images per forward "
        "pass; a pass of more is split. Unset: the whole pass at once",
    )

    @field_validator("model_max_batch_size")
    @classmethod
    def _known_models(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(scorers.SCORER_NAMES))
        if unknown:
            raise ValueError(f"unknown scorer(s) {', '.join(unknown)}: use {', '.join(scorers.SCORER_NAMES)}")
        low = sorted(name for name, size in value.items() if size < 1)
        if low:
            raise ValueError(f"a per-model batch limit is at least 1 ({', '.join(low)})")
        return value


class ColocatedServing(ScorerServing):
    """How the Scoring deployment is served (`args.scorers.colocated`): ScorerServing's fields,
    its batch with per-model limits."""

    batch: ColocatedBatchConfig = ColocatedBatchConfig()


def colocated_deployment_options(serving: ColocatedServing | dict | None = None) -> dict:
    """Serve options of the Scoring deployment, derived as for a single scorer."""
    serving = ColocatedServing.model_validate(serving or {})
    return scorer_deployment_options(serving)


@serve.deployment(
    max_ongoing_requests=colocated_deployment_options()["max_ongoing_requests"],
    health_check_period_s=10,
)
class ColocatedScorer(ScoringReplica):
    """All the weighed text-image models in one replica, and (with `consistency`) the
    image-image model: `score_text(image, prompt)` answers every text-image model's score for
    that image, keyed by model name; `score_pair(image, reference)` answers {"consistency": ...}.
    Both kinds share one pass, each image decoded once for all five models."""

    label = "Scoring"

    def __init__(self, names: list[str], options: dict[str, dict], offline_models_dir: str | None = None,
                 threads: int = 1, input_path: str = "pil", consistency: bool = False):
        self._setup(threads, input_path)
        unknown = sorted(set(names) - set(scorers.SCORER_NAMES))
        if unknown or not names:
            raise ValueError(f"the Scoring deployment holds text-image scorers ({', '.join(scorers.SCORER_NAMES)}); "
                             f"got {names!r}")
        models = {name: load_model(name, options.get(name), offline_models_dir) for name in names}
        # With consistency, image pairs are scored here too: each image decoded once for all five
        # models, and no second process competing for the same cores or device.
        self.consistency = load_model("consistency", options.get("consistency"), offline_models_dir) if consistency else None
        devices = {str(model.device) for model in [*models.values(), *([self.consistency] if consistency else [])]}
        if len(devices) > 1:
            raise ValueError(f"the co-located models must share one device; the config puts them on {sorted(devices)}")
        self.model_sizes: dict[str, list[int]] = {name: [] for name in [*names, *(["consistency"] if consistency else [])]}
        self.ensemble = Ensemble(models, on_batch=self._model_pass)
        self.pairs = EmbeddingCache(self.consistency) if consistency else None

    @property
    def device(self):
        return next(iter(self.ensemble.models.values())).device

    def reconfigure(self, user_config: dict) -> None:
        super().reconfigure({k: v for k, v in (user_config or {}).items() if k != "model_max_batch_size"})
        self.ensemble.set_max_batch(ColocatedBatchConfig.model_validate(user_config or {}).model_max_batch_size)

    def _model_pass(self, name: str, size: int, seconds: float) -> None:
        self.model_sizes[name] = (self.model_sizes[name] + [size])[-1000:]
        hooks().scorer_batch(name, size, seconds)

    def _named(self, output: dict):
        return list(output.items())

    def _result(self, output: dict) -> dict:
        return {name: self._as_dict(one) for name, one in output.items()}

    def _score_texts(self, images: list, prompts: list[str]) -> list:
        return self.ensemble.score(images, prompts)

    def _score_pairs(self, pairs: list[ImagePair], decode) -> list:
        if self.pairs is None:
            raise ValueError("this Scoring replica does not hold the consistency model: image pairs cannot be scored here")
        started = time.perf_counter()
        keyed = [(content_key(p.image), p.image, content_key(p.reference), p.reference) for p in pairs]
        similar = self.pairs.similarity(keyed, decode)
        self._model_pass("consistency", len(pairs), time.perf_counter() - started)
        return [{"consistency": output} for output in similar]

    def _probe(self):
        outputs = self.ensemble.score([probe_image()], ["a health check image"], record=False)
        if self.consistency is not None:
            from PIL import Image

            flipped = probe_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            outputs.append({"consistency": self.consistency.score([probe_image()], [flipped])[0]})
        return outputs

    def model_batch_sizes(self) -> dict[str, list[int]]:
        """Recent forward-pass sizes of each model (a pass over more than a model's limit is
        split), for tests and the benchmarks."""
        return {name: list(sizes) for name, sizes in self.model_sizes.items()}
