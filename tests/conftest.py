"""Real servers for the tests, started once per session by the plugins below: a throwaway
PostgreSQL cluster (tests/postgres.py) and a SeaweedFS S3 server (tests/seaweed.py); and the
tiny scorer models, built once."""

import pytest

pytest_plugins = ["tests.postgres", "tests.seaweed"]


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> str:
    """The tiny random-weight scorer models (scorers.tiny), built once for the session, for
    tests that construct scoring replicas from a models directory."""
    from scorers.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    return str(root)
