"""Real servers for the tests, started once per session by the plugins below: a throwaway
PostgreSQL cluster (tests/postgres.py) and a SeaweedFS S3 server (tests/seaweed.py)."""

pytest_plugins = ["tests.postgres", "tests.seaweed"]
