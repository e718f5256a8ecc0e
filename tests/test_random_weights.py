"""Random-weight scorer models (`offline_models_dir`: the tiny models built for the offline demo)
are refused unless the configuration asks for them in so many words: a production config with
that one line left in would otherwise score real images with noise and say nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.args import AppArgs

ROOT = Path(__file__).resolve().parents[1]


def config_args(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())["applications"][0]["args"]


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gemini.yaml", "serve_config.diffusers.yaml"])
def test_a_production_config_with_offline_models_is_refused(name, tmp_path):
    args = {**config_args(name), "offline_models_dir": str(tmp_path / "models")}
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(args)
    message = str(info.value)
    assert "offline_models_dir" in message and "random weights" in message and "allow_random_weights" in message


def test_serve_refuses_it_when_it_validates_the_builders_args(tmp_path):
    """The path `serve run` takes: Serve validates the config's `args` against the builder's
    annotation (AppArgs) before calling it, so nothing is built or started."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_app

    args = {**config_args("serve_config.yaml"), "offline_models_dir": str(tmp_path / "models")}
    with pytest.raises(ValidationError, match="random weights"):
        call_user_app_builder_with_args_if_necessary(build_app, args)


def test_explicit_consent_is_accepted_and_marks_the_app_offline(tmp_path):
    args = AppArgs.model_validate({
        **config_args("serve_config.yaml"), "offline_models_dir": str(tmp_path / "models"), "allow_random_weights": True,
    })
    assert args.random_weights() is True
    assert args.offline() is True  # real providers, random scorers: the status says offline
    production = AppArgs.model_validate(config_args("serve_config.yaml"))
    assert production.random_weights() is False and production.offline() is False


def test_the_offline_config_says_so_explicitly():
    args = AppArgs.model_validate(config_args("serve_config.offline.yaml"))
    assert args.offline_models_dir and args.allow_random_weights and args.random_weights()


def test_consent_without_offline_models_changes_nothing():
    args = AppArgs.model_validate({**config_args("serve_config.yaml"), "allow_random_weights": True})
    assert args.random_weights() is False
