"""The co-located scoring layout: one deployment, named Scoring, holding the four text-image
models on one device (`args.scorers.layout: colocated`).

Each image is sent once (one request, not four), decoded once and scored by every model in
the same pass; the replica owns its device, or on a CPU machine its cores, instead of four
processes competing for them. The separate layout (one deployment per model, each on its own
GPU fraction) scales each model on its own; which fits which cluster is measured in
docs/benchmarks.md and summed up in docs/serving.md. The consistency model stays its own
deployment in both layouts: it takes image pairs, not prompts.

The engine is `scorers.ensemble.Ensemble` (no Serve in it); this module is the Serve layer:
batching and coalescing, health and figures, shared with the separate layout through
`deployments.scorer.ScoringReplica`.
"""

from __future__ import annotations


from pydantic import Field, field_validator
from ray import serve

import scorers
from deployments.scorer import (
    BatchConfig, ScorerServing, ScoringReplica, decode_input, load_model, probe_image, scorer_deployment_options,
)
from pipeline.telemetry import hooks
from scorers.ensemble import Ensemble


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
    """All the text-image models in one replica; `score(image, prompt)` answers every model's
    score for that image, keyed by model name."""

    label = "Scoring"

    def __init__(self, names: list[str], options: dict[str, dict], offline_models_dir: str | None = None,
                 threads: int = 1, input_path: str = "pil"):
        self._setup(threads, input_path)
        unknown = sorted(set(names) - set(scorers.SCORER_NAMES))
        if unknown or not names:
            raise ValueError(f"the Scoring deployment holds text-image scorers ({', '.join(scorers.SCORER_NAMES)}); "
                             f"got {names!r}")
        models = {name: load_model(name, options.get(name), offline_models_dir) for name in names}
        devices = {str(model.device) for model in models.values()}
        if len(devices) > 1:
            raise ValueError(f"the co-located models must share one device; the config puts them on {sorted(devices)}")
        self.device = next(iter(models.values())).device
        self.model_sizes: dict[str, list[int]] = {name: [] for name in names}
        self.ensemble = Ensemble(models, on_batch=self._model_pass)

    def reconfigure(self, user_config: dict) -> None:
        super().reconfigure({k: v for k, v in (user_config or {}).items() if k != "model_max_batch_size"})
        config = ColocatedBatchConfig.model_validate(user_config or {})
        unknown = sorted(set(config.model_max_batch_size) - set(self.ensemble.models))
        if unknown:
            raise ValueError(f"model_max_batch_size names scorers this replica does not hold: {', '.join(unknown)}")
        self.ensemble.max_batch = {name: config.model_max_batch_size.get(name, 0) for name in self.ensemble.models}

    def _model_pass(self, name: str, size: int, seconds: float) -> None:
        self.model_sizes[name] = (self.model_sizes[name] + [size])[-1000:]
        hooks().scorer_batch(name, size, seconds)

    def _named(self, output: dict):
        return list(output.items())

    def _result(self, output: dict) -> dict:
        return {name: self._as_dict(one) for name, one in output.items()}

    def _score(self, requests: list[tuple[bytes, str]]):
        # Decoded once for all the models, through the one image intake; an ImageError fails the
        # pass and the coalescer's isolation names the bad image to its own caller.
        images = [decode_input(data, self.input_path) for data, _ in requests]
        return self.ensemble.score(images, [prompt for _, prompt in requests])

    def _probe(self):
        return self.ensemble.score([probe_image()], ["a health check image"])

    def model_batch_sizes(self) -> dict[str, list[int]]:
        """Recent forward-pass sizes of each model (a pass over more than a model's limit is
        split), for tests and the benchmarks."""
        return {name: list(sizes) for name, sizes in self.model_sizes.items()}
