"""Waiting for an event instead of for a while, for the negative checks ("nothing was written
after ...", "no call followed ..."): a fixed sleep passes falsely on a machine slow enough that
the straggler has not run yet."""

from __future__ import annotations

import asyncio

import pytest


async def until_settled(before: set[asyncio.Task], timeout_s: float = 60) -> None:
    """Wait until every task started since `before` has ended (a run's children, its lease
    renewal, its writes in threads, which their tasks await): a check that nothing happened
    after that does not depend on having waited long enough. Fails if one is still running
    after `timeout_s`, a bound no healthy run comes near."""
    loop, me = asyncio.get_running_loop(), asyncio.current_task()
    deadline = loop.time() + timeout_s
    while alive := [t for t in asyncio.all_tasks() if t not in before and t is not me and not t.done()]:
        if loop.time() > deadline:
            pytest.fail(f"{len(alive)} task(s) still running {timeout_s:.0f} s after the run ended: {alive}")
        await asyncio.sleep(0.01)
