"""pytest plugin: a throwaway PostgreSQL cluster for the session, a fresh database per test.

The cluster lives in a temp dir on a free loopback port with trust auth and its unix socket in
the same dir, so it touches nothing of the machine's. As root, `initdb` and `pg_ctl` refuse to
run, so they run as the `postgres` user (`runuser`). With no PostgreSQL binaries the tests that
need it skip and say why (`make test` installs Debian's `postgresql` package when it can).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

_counter = itertools.count()


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="sceneref-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, user="postgres", group="postgres")
            os.chmod(self.root, 0o700)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start the server on the cluster's data (again, after `stop_server`), same port."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop_server(self) -> None:
        """An outage: the server goes away (open connections are closed, new ones refused) and
        keeps its data, so `start_server` brings the same databases back. A fast shutdown, not
        an immediate one: the cluster runs with synchronous_commit=off, with which a crash may
        lose the last commits, which is not the outage under test."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)


def _started_cluster() -> PostgresCluster:
    bin_dir = _bin_dir()
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
