"""Application builder: `serve run serve_config.yaml` calls `build_app` with the config's
`args`, validated as AppArgs. Deployment options (GPU fractions, batching, autoscaling) come
from the config's `deployments:` list, keyed by the names bound here."""

# No `from __future__ import annotations` here: Serve validates `args` against the builder's
# annotation only when it is the AppArgs class itself, not the string "AppArgs".
import os
from pathlib import Path

from ray.serve import Application

from deployments.args import AppArgs
from deployments.ingress import Ingress
from deployments.providers import ImageGenerator, PromptAgents
from deployments.scorer import ScorerDeployment

SCORER_DEPLOYMENTS = {"pickscore": "PickScore", "clipscore": "CLIPScore", "vqascore": "VQAScore", "aesthetic": "Aesthetic"}


def build_app(args: AppArgs) -> Application:
    """The builder `serve run` calls (Serve allows exactly one parameter)."""
    return build(args)


def build(args: AppArgs, ingress_options: dict | None = None) -> Application:
    """`ingress_options` (Serve deployment options) are for tests that deploy without a config
    file; `serve run` sets replicas, resources and autoscaling in the config's `deployments:`."""
    args = args.resolved(Path(os.getcwd()))
    scoring = args.pipeline.scoring
    scorers = {
        name: ScorerDeployment.options(name=deployment).bind(name, scoring.options_for(name), args.offline_models_dir)
        for name, deployment in SCORER_DEPLOYMENTS.items()
    }
    ingress = Ingress.options(**ingress_options) if ingress_options else Ingress
    return ingress.bind(
        scorers["pickscore"],
        scorers["clipscore"],
        scorers["vqascore"],
        scorers["aesthetic"],
        ImageGenerator.bind(args.pipeline),
        PromptAgents.bind(args.pipeline),
        args,
    )
