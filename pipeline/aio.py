"""The asyncio rules every part of the product follows, written once: the runner, the job
worker and the Serve adapters use them.

- `all_or_nothing`: a group of concurrent steps succeeds together or not at all; the first
  failure stops the siblings, and nothing of the group is still running when the caller sees it.
- `shielded` / `landed`: a write that has started is never abandoned half-way by a
  cancellation; the cancellation goes on once the write has landed.
- `observe`: a task nobody awaits still has its outcome retrieved and logged, so an error is
  never left for asyncio to report as "Task exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable


async def all_or_nothing(coroutines: Iterable[Awaitable[Any]]) -> list:
    """Await all of `coroutines` as one group and return their results in order. The first
    failure cancels the others, waits for them to end, and is raised as itself (not wrapped in
    an ExceptionGroup), so callers keep catching plain errors. A cancellation of the caller
    cancels every child, waits for them, and propagates.

    Not asyncio.TaskGroup: on Python 3.11 a child's failure leaves the parent task's cancel
    request counted (`cancelling()` stays 1, fixed in 3.12), which the job worker's own
    timeouts and cancellation checks would then misread."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        await cancel_all(tasks)
        raise
    errors = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if errors:
        await cancel_all(tasks)
        raise errors[0]
    return [task.result() for task in tasks]


async def cancel_all(tasks: list[asyncio.Future]) -> None:
    """Cancel `tasks` and wait until every one has ended; their outcomes are retrieved, so
    asyncio never logs "exception was never retrieved" for them."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def shielded(work: Awaitable[Any]) -> Any:
    """Run `work` to its end even if we are cancelled meanwhile (as often as that happens);
    re-raise the cancellation after. For the writes that must land: a job's final status."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                result = task.result()
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def landed(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run blocking I/O in a worker thread. A write cannot be stopped half-way, so when the
    caller is cancelled meanwhile the write is waited for before CancelledError goes on (its
    own outcome is retrieved and dropped: the cancellation is what goes on)."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()
        raise


def observe(task: asyncio.Future, log: logging.Logger, what: str) -> None:
    """Retrieve the outcome of a finished task nobody awaits, logging an error it raised as
    `what`. Use as a done callback (functools.partial(observe, log=..., what=...))."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s", what, exc_info=task.exception())
