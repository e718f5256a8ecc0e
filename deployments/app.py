"""Application builder: `serve run serve_config.yaml` calls `build_app` with the config's
`args`, validated as AppArgs. The scorers' Serve options (batching, CPU/GPU, replicas) are
derived from the typed `args.scorers`; the other deployments' options come from the config's
`deployments:` list, keyed by the names bound here."""

# No `from __future__ import annotations` here: Serve validates `args` against the builder's
# annotation only when it is the AppArgs class itself, not the string "AppArgs".
import os
from pathlib import Path

from ray.serve import Application

from scorers import registry

from deployments.adapters import ScorerHandles
from deployments.args import AppArgs
from deployments.ingress import Ingress
from deployments.diffusion import DiffusionGenerator
from deployments.providers import ImageGenerator, PromptAgents
from deployments.colocated import ColocatedScorer, colocated_deployment_options
from deployments.scorer import ScorerDeployment, scorer_deployment_options

COLOCATED_DEPLOYMENT = "Scoring"  # the one scoring deployment of the colocated layout
SCORER_DEPLOYMENTS = {entry.name: entry.deployment for entry in registry.entries()}
"""Scorer name -> its deployment's name in the separate layout, as the scorer registry says."""


def build_app(args: AppArgs) -> Application:
    """The builder `serve run` calls (Serve allows exactly one parameter)."""
    return build(args)


def image_generator(args: AppArgs) -> Application:
    """The deployment named ImageGenerator: a client of an image API, or, with provider
    `diffusers`, the self-hosted generator on its own (fractional) GPU. One name either way, so
    the config's `deployments:` entry for ImageGenerator sets its resources."""
    images = args.pipeline.images
    if images.provider != "diffusers":
        return ImageGenerator.bind(settings=args.pipeline)
    batch = images.diffusion.max_batch_size
    return DiffusionGenerator.options(name="ImageGenerator", max_ongoing_requests=max(32, 2 * batch)).bind(
        settings=images.diffusion, offline_models_dir=args.offline_models_dir
    )


def scoring_deployments(args: AppArgs) -> ScorerHandles:
    """The scoring deployments of `args.scorers.layout`, by role: one per registered scorer
    (separate; all of them, so a weight changed by `serve deploy` needs no new deployment), or
    the one Scoring deployment holding the text-image models with a positive weight and the
    image-image model (colocated)."""
    scoring = args.pipeline.scoring
    common = dict(offline_models_dir=args.offline_models_dir, input_path=scoring.input_path)
    if args.scorers.layout == "colocated":
        serving = args.scorers.colocated
        weights = scoring.weights.as_dict()
        active = [name for name in registry.names(registry.TEXT_IMAGE) if weights.get(name, 0) > 0]
        [pairs] = registry.names(registry.IMAGE_IMAGE)  # the Scoring replica holds one consistency model
        deployment = ColocatedScorer.options(name=COLOCATED_DEPLOYMENT, **colocated_deployment_options(serving)).bind(
            names=active, options={name: scoring.options_for(name) for name in [*active, pairs]},
            threads=serving.torch_threads(), consistency=True, **common,
        )
        return ScorerHandles(layout="colocated", colocated=deployment)
    per_model, consistency = {}, None
    for entry in registry.entries():
        serving = args.scorers.serving(entry.name)
        deployment = ScorerDeployment.options(name=entry.deployment, **scorer_deployment_options(serving)).bind(
            name=entry.name, options=scoring.options_for(entry.name), threads=serving.torch_threads(), **common,
        )
        if entry.kind == registry.TEXT_IMAGE:
            per_model[entry.name] = deployment
        else:
            consistency = deployment
    return ScorerHandles(layout="separate", per_model=per_model, consistency=consistency)


def build(args: AppArgs, ingress_options: dict | None = None) -> Application:
    """`ingress_options` (Serve deployment options) are for tests that deploy without a config
    file; `serve run` sets replicas, resources and autoscaling in the config's `deployments:`."""
    args = args.resolved(Path(os.getcwd()))
    ingress = Ingress.options(**ingress_options) if ingress_options else Ingress
    return ingress.bind(
        scorers=scoring_deployments(args), generator=image_generator(args), agents=PromptAgents.bind(settings=args.pipeline),
        args=args,
    )
