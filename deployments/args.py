"""Typed arguments of the application builder: everything `serve run serve_config.yaml` can
set without code changes (models, providers, stores, weights, auth, limits)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.adapters import HandleRetry
from deployments.auth import AuthSettings, load_secret
from deployments.colocated import ColocatedServing
from deployments.scorer import ScorerServing
from deployments.uploads import UploadLimits
from pipeline.jobs.limits import AdmissionLimits
from pipeline.jobs.retention import RetentionSettings
from pipeline.jobs.worker import JobSettings  # the worker's own settings, set here per app
from pipeline.settings import PipelineSettings


class ScorersServing(BaseModel):
    """Per scorer, how it is served (batch, CPU/GPU, threads, replicas): one typed place, from
    which `deployments.app` derives each scorer deployment's Serve options.

    `layout` picks one deployment per model (`separate`: each on its own GPU fraction, scaled
    on its own; the entries below) or one deployment holding the four text-image models and the
    consistency model (`colocated`: each image sent and decoded once; `colocated` below). Which
    fits which cluster: docs/serving.md."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["separate", "colocated"] = "separate"
    colocated: ColocatedServing = Field(
        ColocatedServing(), description="the Scoring deployment of the colocated layout (unused when separate)"
    )
    pickscore: ScorerServing = ScorerServing()
    clipscore: ScorerServing = ScorerServing()
    vqascore: ScorerServing = ScorerServing()
    aesthetic: ScorerServing = ScorerServing()
    consistency: ScorerServing = ScorerServing()  # image-image: DINOv2, small

    def serving(self, name: str) -> ScorerServing:
        """How scorer `name` is served in the separate layout; defaults for a registered scorer
        this config has no entry for."""
        return getattr(self, name, None) or ScorerServing()


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: PipelineSettings = PipelineSettings()
    auth: AuthSettings = AuthSettings()
    database_url: str = Field("sqlite:///output/sceneref.db", description="job store; any SQLAlchemy URL")
    database_url_env: str = Field(
        "SCENEREF_DATABASE_URL",
        description="when this environment variable is set where the replica runs, its URL wins over "
        "database_url (keeps a password out of the config; a Kubernetes Secret sets it)",
    )
    offline_models_dir: str | None = Field(
        None, description="offline demo: build tiny random-weight scorer models here on first use and load them "
        "(under any provider); refused unless allow_random_weights is true",
    )
    allow_random_weights: bool = Field(
        False, description="consent to offline_models_dir's random-weight models, whose scores are noise: set only "
        "in offline and test configs; every status then says offline: true",
    )
    url_secret_env: str = Field(
        "SCENEREF_URL_SECRET", description="key for signed image URLs; falls back to the HS256 JWT secret"
    )
    url_ttl_s: int = Field(3600, gt=0)
    public_base_url: str | None = Field(
        None,
        description="the service's public URL (https://sceneref.example.com): the base of every link the API "
        "returns (status_url, reference_image_url); the request's Host header is never trusted for them",
    )
    scorers: ScorersServing = ScorersServing()
    uploads: UploadLimits = UploadLimits()
    jobs: JobSettings = JobSettings()
    handle_retry: HandleRetry = Field(
        HandleRetry(), description="retries of calls whose replica went away (a dead actor, no live replica yet)"
    )
    limits: AdmissionLimits = AdmissionLimits()
    retention: RetentionSettings = RetentionSettings()

    @model_validator(mode="after")
    def _no_silent_random_weights(self) -> "AppArgs":
        """A production config with `offline_models_dir` left in would score real images with
        noise and look healthy: refuse it when the config is validated, before anything starts."""
        if self.offline_models_dir and not self.allow_random_weights:
            raise ValueError(
                f"offline_models_dir is set ({self.offline_models_dir}): every scorer would load tiny models with "
                "random weights, whose scores are noise. Remove offline_models_dir for real models, or set "
                "allow_random_weights: true for an offline demo or a test"
            )
        return self

    @model_validator(mode="after")
    def _object_store_outage_outlasts_the_lease(self) -> "AppArgs":
        """Running generations wait out an object-store outage for pipeline.s3.outage_wait_s: a
        bound shorter than the lease would fail jobs over a restart that the lease rides out."""
        if self.pipeline.s3.outage_wait_s < self.jobs.lease_s:
            raise ValueError(
                f"pipeline.s3.outage_wait_s ({self.pipeline.s3.outage_wait_s:g}) must be at least "
                f"jobs.lease_s ({self.jobs.lease_s:g})"
            )
        return self

    def random_weights(self) -> bool:
        """The scorers (and a diffusers generator) run on random weights: the app is a demo."""
        return bool(self.offline_models_dir) and self.allow_random_weights

    def offline(self) -> bool:
        """What every status's `offline` says: offline providers, or scorers on random weights."""
        pipeline = self.pipeline
        return pipeline.images.provider == "offline" or pipeline.llm.provider == "offline" or self.random_weights()

    def job_store_url(self) -> str:
        return os.environ.get(self.database_url_env) or self.database_url

    def url_secret(self) -> str:
        if os.environ.get(self.url_secret_env):
            return load_secret(self.url_secret_env)
        return load_secret(self.auth.secret_env)

    def resolved(self, cwd: Path) -> "AppArgs":
        """Relative paths are taken from where `serve run` was started, not from wherever a
        replica process happens to run."""

        def absolute(path):
            if "://" in str(path) or Path(path).is_absolute():  # a store URL (s3://, file://) stays as written
                return path
            return cwd / path if isinstance(path, Path) else str(cwd / path)

        pipeline = self.pipeline.model_copy(
            update={
                "artifacts_dir": absolute(self.pipeline.artifacts_dir),
                "traces": self.pipeline.traces.model_copy(update={"root": absolute(self.pipeline.traces.root)}),
            }
        )
        url = self.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            url = prefix + str(absolute(url[len(prefix):]))
        models = str(absolute(self.offline_models_dir)) if self.offline_models_dir else None
        return self.model_copy(update={"pipeline": pipeline, "database_url": url, "offline_models_dir": models})
