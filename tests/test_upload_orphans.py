"""A submission with an image stores the upload before it creates the job's row: when creating
the row fails, the ingress removes the upload again (nothing stored without a row), unless the
row exists after all (a commit whose answer was lost: the job needs its image). What it cannot
decide at once, retention's orphan sweep decides later (tests/test_retention.py).

The ingress is built bare (no Serve): only what `_submit` uses; the readiness and store checks
answer ready, since they are not what is tested here."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from deployments.args import AppArgs
from deployments.ingress import Ingress
from pipeline.jobs.store import JobStore
from pipeline.jobs.worker import JobSettings, JobWorker
from pipeline.storage.objectstore import LocalObjectStore
from pipeline.storage.factory import open_store
from pipeline.schemas import GenerationRequest

READY = SimpleNamespace(ready=True, ok=True)


class _Bare(Ingress.func_or_class):
    def __del__(self):  # the replica's shutdown hook: nothing to stop here
        pass


class FailingCreate(JobStore):
    """The database fails the insert; with `commit_first`, after it landed (the answer was lost)."""

    def __init__(self, url: str, *, commit_first: bool = False):
        super().__init__(url)
        self.commit_first = commit_first

    def create(self, generation_id, *args, **kwargs):
        if self.commit_first:
            super().create(generation_id, *args, **kwargs)
        raise OperationalError("INSERT INTO jobs ...", {}, Exception("server closed the connection unexpectedly"))


def bare_ingress(store: JobStore, artifacts) -> _Bare:
    ingress = object.__new__(_Bare)
    ready = SimpleNamespace(check=lambda: asyncio.sleep(0, READY))
    ingress.readiness = ingress.store_check = ready
    ingress.api_pool = ThreadPoolExecutor(max_workers=2)
    ingress.store, ingress.artifacts, ingress.offline = store, artifacts, True
    ingress.worker = JobWorker(store, None, None, JobSettings(), holder="ingress-test")  # not started
    ingress.args = AppArgs()
    return ingress


@pytest.fixture(params=["local", "s3"])
def artifacts(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "artifacts")
    where = request.getfixturevalue("s3_location")
    return open_store(f"{where.url}/artifacts", where.settings)


def upload() -> SimpleNamespace:
    """What `_submit` reads of an accepted upload (deployments.uploads.PreparedImage)."""
    return SimpleNamespace(png=b"\x89PNG user image", original=b"\xff\xd8 the original jpeg", original_format="jpeg")


async def submit(ingress) -> None:
    request = GenerationRequest(prompt="Fresh juice for a sunny afternoon picnic", target_duration=15)
    await ingress._submit(request, SimpleNamespace(subject="alice"), http=None, upload=upload())


async def test_an_upload_whose_row_cannot_be_created_is_removed(tmp_path, artifacts):
    store = FailingCreate(f"sqlite:///{tmp_path}/jobs.db")
    ingress = bare_ingress(store, artifacts)
    try:
        with pytest.raises(OperationalError):
            await submit(ingress)
        assert artifacts.list() == []  # nothing stored without a row
    finally:
        ingress.api_pool.shutdown()
        store.close()


async def test_an_upload_whose_row_was_created_after_all_is_kept(tmp_path, artifacts):
    store = FailingCreate(f"sqlite:///{tmp_path}/jobs.db", commit_first=True)
    ingress = bare_ingress(store, artifacts)
    try:
        with pytest.raises(OperationalError):
            await submit(ingress)
        [record] = store.unfinished()
        assert artifacts.get(record.reference_key) == b"\x89PNG user image"  # the job finds its image
    finally:
        ingress.api_pool.shutdown()
        store.close()
