"""The scorer deployments' coalescer: one forward pass at a time over all waiting groups."""

import asyncio

import pytest

from deployments.scorer import Coalescer


async def test_groups_waiting_during_a_pass_are_merged_up_to_the_limit():
    passes = []
    release = asyncio.Event()

    async def forward(items):
        passes.append(list(items))
        if len(passes) == 1:
            await release.wait()  # the model is busy while more groups arrive
        return [item * 10 for item in items]

    coalescer = Coalescer(forward, max_items=5)
    first = asyncio.create_task(coalescer.submit([1]))
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(coalescer.submit(group)) for group in ([2, 3], [4], [5, 6], [7])]
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(first, *waiting)
    assert results == [[10], [20, 30], [40], [50, 60], [70]]
    # [2, 3] + [4] fit in 5 items; [5, 6] would make 5 too and joins; [7] is the next pass.
    assert passes == [[1], [2, 3, 4, 5, 6], [7]]


async def test_a_group_is_never_split_and_errors_reach_every_caller_of_the_pass():
    async def forward(items):
        if 99 in items:
            raise ValueError("bad image")
        return items

    coalescer = Coalescer(forward, max_items=2)
    assert await coalescer.submit([1, 2, 3]) == [1, 2, 3]  # a group larger than the limit runs whole
    with pytest.raises(ValueError, match="bad image"):
        await coalescer.submit([99])
    assert await coalescer.submit([4]) == [4]  # the worker survives a failed pass
