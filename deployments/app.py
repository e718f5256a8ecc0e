"""Application builder: `serve run serve_config.yaml` calls `build_app` with the config's
`args`, validated as AppArgs. The scorers' Serve options (batching, CPU/GPU, replicas) are
derived from the typed `args.scorers`; the other deployments' options come from the config's
`deployments:` list, keyed by the names bound here."""

# No `from __future__ import annotations` here: Serve validates `args` against the builder's
# annotation only when it is the AppArgs class itself, not the string "AppArgs".
import os
from pathlib import Path

from ray.serve import Application

import scorers

from deployments.args import AppArgs
from deployments.ingress import Ingress
from deployments.diffusion import DiffusionGenerator
from deployments.providers import ImageGenerator, PromptAgents
from deployments.colocated import ColocatedScorer, colocated_deployment_options
from deployments.scorer import ScorerDeployment, scorer_deployment_options

COLOCATED_DEPLOYMENT = "Scoring"  # the one scoring deployment of the colocated layout
SCORER_DEPLOYMENTS = {
    "pickscore": "PickScore", "clipscore": "CLIPScore", "vqascore": "VQAScore", "aesthetic": "Aesthetic",
    "consistency": "Consistency",  # image against reference image: reported always, weighted per config
}


def build_app(args: AppArgs) -> Application:
    """The builder `serve run` calls (Serve allows exactly one parameter)."""
    return build(args)


def image_generator(args: AppArgs) -> Application:
    """The deployment named ImageGenerator: a client of an image API, or, with provider
    `diffusers`, the self-hosted generator on its own (fractional) GPU. One name either way, so
    the config's `deployments:` entry for ImageGenerator sets its resources."""
    images = args.pipeline.images
    if images.provider != "diffusers":
        return ImageGenerator.bind(args.pipeline)
    batch = images.diffusion.max_batch_size
    return DiffusionGenerator.options(name="ImageGenerator", max_ongoing_requests=max(32, 2 * batch)).bind(
        images.diffusion, args.offline_models_dir
    )


def scoring_deployments(args: AppArgs) -> dict[str, Application]:
    """The scoring deployments of `args.scorers.layout`, keyed as the ingress reads them: per
    model name and "consistency" (separate), or {"scoring": the Scoring deployment, which holds
    the consistency model too} (colocated). The colocated layout loads only the text-image
    models with a positive weight; the separate layout deploys all four (a weight changed by
    `serve deploy` needs no new deployment)."""
    scoring = args.pipeline.scoring
    input_path = scoring.input_path
    served = {}
    names = [] if args.scorers.layout == "colocated" else list(SCORER_DEPLOYMENTS)
    for name in names:
        serving = getattr(args.scorers, name)
        served[name] = ScorerDeployment.options(name=SCORER_DEPLOYMENTS[name], **scorer_deployment_options(serving)).bind(
            name, scoring.options_for(name), args.offline_models_dir, serving.torch_threads(), input_path
        )
    if args.scorers.layout == "colocated":
        serving = args.scorers.colocated
        weights = scoring.weights.as_dict()
        active = [name for name in scorers.SCORER_NAMES if weights.get(name, 0) > 0]
        served["scoring"] = ColocatedScorer.options(name=COLOCATED_DEPLOYMENT, **colocated_deployment_options(serving)).bind(
            active, {name: scoring.options_for(name) for name in [*active, "consistency"]}, args.offline_models_dir,
            serving.torch_threads(), input_path, True,
        )
    return served


def build(args: AppArgs, ingress_options: dict | None = None) -> Application:
    """`ingress_options` (Serve deployment options) are for tests that deploy without a config
    file; `serve run` sets replicas, resources and autoscaling in the config's `deployments:`."""
    args = args.resolved(Path(os.getcwd()))
    served = scoring_deployments(args)
    consistency = served.pop("consistency", None)  # colocated: held by the Scoring deployment
    ingress = Ingress.options(**ingress_options) if ingress_options else Ingress
    return ingress.bind(served, consistency, image_generator(args), PromptAgents.bind(args.pipeline), args)
