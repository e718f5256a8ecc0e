"""Real servers for the tests, started once per session by the plugins below: a throwaway
PostgreSQL cluster (tests/postgres.py) and a SeaweedFS S3 server (tests/seaweed.py), both over testkit/; and the
tiny scorer models, built once.

In CI (`CI` set, as CI systems do) a skip raised by those servers' plugins or by the browser
fixture is a failure: there a missing binary must not turn the PostgreSQL, S3 and browser tests
into a green run that never ran them. Elsewhere they skip and say why (`make test` runs -rs)."""

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.postgres", "tests.seaweed", "pytester"]  # pytester: tests/test_ci_skips.py

TESTS = Path(__file__).resolve().parent
# Where a skip means "a real server or browser is missing", not "this test does not apply here".
REQUIRED_IN_CI = {TESTS / "postgres.py", TESTS / "seaweed.py", TESTS / "serve" / "test_viewer_browser.py"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def required_origin(excinfo: pytest.ExceptionInfo) -> Path | None:
    """The file in REQUIRED_IN_CI that raised this skip, if one did."""
    for entry in excinfo.traceback:
        path = Path(str(entry.path)).resolve()
        if path in REQUIRED_IN_CI:
            return path
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or call.excinfo is None or not in_ci():
        return
    origin = required_origin(call.excinfo)
    if origin is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI, where it must run (CI={os.environ['CI']!r}): {call.excinfo.value} "
            f"[from {origin.relative_to(TESTS.parent)}]"
        )


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> str:
    """The tiny random-weight scorer models (scorers.tiny), built once for the session, for
    tests that construct scoring replicas from a models directory."""
    from scorers.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    return str(root)
