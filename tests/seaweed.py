"""pytest plugin: a real S3 server (SeaweedFS, testkit/seaweed.py) for the object-store tests.

`s3_server` (session) starts one and stops it at the end of the session. `s3_location`
(function) gives each test a fresh prefix in the session's bucket, as an `s3://` URL plus the
S3Settings to open it with. Where the binary is missing or cannot run here, the tests that need
it skip with the reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from pipeline.settings import S3Settings
from testkit.seaweed import SeaweedProcess, SeaweedUnavailable, seaweed, seaweed_process


@dataclass(frozen=True)
class S3Location:
    url: str
    settings: S3Settings
    bucket: str
    prefix: str


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    try:
        server = seaweed(tmp_path_factory.mktemp("seaweedfs"))
        running = server.__enter__()
    except SeaweedUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield running
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def s3_location(s3_server) -> S3Location:
    """A prefix no other test uses, in the session's bucket (a bucket per test would make
    SeaweedFS allocate volumes for each)."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    return S3Location(f"s3://{s3_server.bucket}/{prefix}", s3_server.settings(), s3_server.bucket, prefix)


@pytest.fixture(scope="module")
def _s3_outage_process(tmp_path_factory):
    try:
        with seaweed_process(tmp_path_factory.mktemp("seaweedfs-outage")) as weed:
            yield weed
    except SeaweedUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def s3_outage(_s3_outage_process) -> SeaweedProcess:
    """A SeaweedFS server of this module's own, which the test may `stop()` and `start()` again
    (same ports, same data): the session's `s3_server` is never taken down under other tests.
    Running at the start of every test, whatever the previous one left."""
    if _s3_outage_process.process is None:
        _s3_outage_process.start()
    return _s3_outage_process
