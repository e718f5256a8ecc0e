"""The ingress observes every task it starts (deployments/ingress.py `_start`): a run that
raises is logged, never left for asyncio to report as "Task exception was never retrieved"
when the task is collected. The ingress is built bare (no Serve): only what `_start` uses."""

from __future__ import annotations

import asyncio
import gc
import logging
from types import SimpleNamespace

from sqlalchemy.exc import OperationalError

from deployments.ingress import Ingress
from pipeline.jobs.store import JobStore
from pipeline.jobs.leases import Lease


class _Bare(Ingress.func_or_class):
    def __del__(self):  # the replica's shutdown hook: nothing to stop here
        pass


def bare_ingress(store: JobStore):
    ingress = object.__new__(_Bare)
    ingress.tasks, ingress.background, ingress.wake = {}, set(), asyncio.Event()
    ingress.store, ingress.services, ingress.settings, ingress.holder = store, None, None, "ingress-test"
    ingress.args = SimpleNamespace(jobs=SimpleNamespace(lease_s=30.0, store_outage_s=120.0))
    return ingress


async def test_a_run_that_raises_is_logged_not_left_unretrieved(tmp_path, monkeypatch, caplog):
    async def crashing_run(*args, **kwargs):
        raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr("deployments.ingress.execute_job", crashing_run)
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    try:
        ingress = bare_ingress(store)
        with caplog.at_level(logging.ERROR, logger="sceneref.ingress"):
            ingress._start(Lease("gen-1", "ingress-test", 1, None))
            task = ingress.tasks["gen-1"]
            await asyncio.wait([task])
            for _ in range(20):  # the done callback, then its follow-up task (count of the final status)
                await asyncio.sleep(0.01)
        del task
        gc.collect()  # an unretrieved exception is reported when its task is collected
        assert ingress.tasks == {} and ingress.wake.is_set()
        assert not unretrieved, [c.get("message") for c in unretrieved]
        assert "generation gen-1: its run raised" in caplog.text and "OperationalError" in caplog.text
    finally:
        loop.set_exception_handler(previous)
        store.close()
