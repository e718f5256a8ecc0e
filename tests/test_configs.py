"""The shipped Serve configs validate as the builder's typed args, and keep the shape of many
replicas on one job store: several ingress replicas sharing jobs, cluster stores in production."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.args import AppArgs
from pipeline.storage.objectstore import is_url

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> tuple[AppArgs, dict]:
    config = yaml.safe_load((ROOT / name).read_text())
    [app] = config["applications"]
    return AppArgs.model_validate(app["args"]), {d["name"]: d for d in app["deployments"]}


def test_production_config_runs_replicas_on_shared_stores():
    args, deployments = load("serve_config.yaml")
    assert args.database_url.startswith("postgresql+psycopg://")
    assert is_url(args.pipeline.artifacts_dir) and str(args.pipeline.artifacts_dir).startswith("s3://")
    assert is_url(args.pipeline.traces.root) and str(args.pipeline.traces.root).startswith("s3://")
    ingress = deployments["Ingress"]
    assert "num_replicas" not in ingress and ingress["autoscaling_config"]["min_replicas"] >= 2
    assert ingress["graceful_shutdown_timeout_s"] >= 10


def test_offline_config_exercises_two_ingress_replicas():
    args, deployments = load("serve_config.offline.yaml")
    assert deployments["Ingress"]["num_replicas"] == 2
    assert args.database_url.startswith("sqlite:///") and not is_url(args.pipeline.artifacts_dir)


def test_database_url_from_the_environment_wins(monkeypatch):
    args, _ = load("serve_config.yaml")
    monkeypatch.setenv(args.database_url_env, "postgresql+psycopg://u:secret@db/x")
    assert args.job_store_url() == "postgresql+psycopg://u:secret@db/x"
    monkeypatch.delenv(args.database_url_env)
    assert args.job_store_url() == args.database_url


def test_the_gemini_config_differs_from_production_only_in_its_providers():
    """serve_config.gemini.yaml is serve_config.yaml with Google's models: nothing else may drift."""
    from pathlib import Path

    import yaml

    from deployments.args import AppArgs

    root = Path(__file__).resolve().parents[1]
    production, gemini = (yaml.safe_load((root / name).read_text()) for name in ("serve_config.yaml", "serve_config.gemini.yaml"))
    providers = []
    for config in (production, gemini):
        pipeline = config["applications"][0]["args"]["pipeline"]
        providers.append((pipeline.pop("llm")["provider"], pipeline.pop("images")["provider"]))
    assert production == gemini
    assert providers == [("openai", "openai"), ("gemini", "gemini")]
    args = AppArgs.model_validate(yaml.safe_load((root / "serve_config.gemini.yaml").read_text())["applications"][0]["args"])
    assert args.pipeline.images.model.startswith("gemini") and args.pipeline.llm.base_url


def test_the_diffusers_config_differs_from_production_only_in_its_generator():
    from pathlib import Path

    import yaml

    from deployments.args import AppArgs

    root = Path(__file__).resolve().parents[1]
    production, own = (yaml.safe_load((root / name).read_text()) for name in ("serve_config.yaml", "serve_config.diffusers.yaml"))
    generators = []
    for config in (production, own):
        app = config["applications"][0]
        generators.append((app["args"]["pipeline"].pop("images")["provider"],
                           next(d for d in app["deployments"] if d["name"] == "ImageGenerator")["ray_actor_options"]["num_gpus"]))
        app["deployments"] = [d for d in app["deployments"] if d["name"] != "ImageGenerator"]
    assert production == own
    assert generators == [("openai", 0), ("diffusers", 1)]
    args = AppArgs.model_validate(yaml.safe_load((root / "serve_config.diffusers.yaml").read_text())["applications"][0]["args"])
    assert args.pipeline.images.diffusion.model == "stabilityai/sdxl-turbo"
