"""pytest plugin: a throwaway PostgreSQL cluster (testkit/postgres.py) for the session, a fresh
database per test. With no PostgreSQL binaries the tests that need it skip and say why
(`make test` installs Debian's `postgresql` package when it can).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

from testkit import postgres as machinery
from testkit.postgres import PostgresCluster

_counter = itertools.count()


def _started_cluster() -> PostgresCluster:
    bin_dir = machinery.bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (no /usr/lib/postgresql/*/bin/initdb); apt-get install postgresql")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) is not installed")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(cluster.root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}")
    return cluster


@pytest.fixture(scope="session")
def postgres_cluster():
    cluster = _started_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def postgres_outage_cluster():
    """A cluster of the module's own, for tests that stop and restart the server
    (`stop_server`/`start_server`): an outage never reaches the session's cluster."""
    cluster = _started_cluster()
    yield cluster
    try:
        cluster.start_server()  # a test that failed mid-outage left it stopped
    except subprocess.CalledProcessError:
        pass
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster) -> str:
    """The session cluster's maintenance database (shared: prefer `postgres_db`)."""
    return postgres_cluster.url()


@pytest.fixture
def postgres_db(postgres_cluster) -> str:
    """A URL to a fresh, empty database of its own for one test, dropped afterwards."""
    name = f"test_{os.getpid()}_{next(_counter)}"
    postgres_cluster.admin(f'CREATE DATABASE "{name}"')
    yield postgres_cluster.url(name)
    postgres_cluster.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
