"""Group commit: items arriving while a batch is written are written together; a bad item fails
only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from server.domain.batching import GroupCommit


class Writes:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, items: Sequence[str]) -> list[None]:
        await self.gate.wait()
        if "bad" in items:
            raise ValueError("bad item")
        self.batches.append(list(items))
        return [None] * len(items)


async def test_items_arriving_during_a_write_share_the_next_batch() -> None:
    writes = Writes()
    group = GroupCommit(writes.write, max_batch=3)
    writes.gate.clear()
    first = asyncio.create_task(group.submit("a"))
    async with asyncio.timeout(5):
        while group.waiting < 1:
            await asyncio.sleep(0)
    rest = [asyncio.create_task(group.submit(x)) for x in "bcdef"]
    async with asyncio.timeout(5):
        while group.waiting < 6:
            await asyncio.sleep(0)
    writes.gate.set()
    await asyncio.gather(first, *rest)
    # The first alone (taken before the others came), then the rest at most 3 at a time.
    assert writes.batches == [["a"], ["b", "c", "d"], ["e", "f"]]
    assert group.waiting == 0


async def test_a_bad_item_fails_only_its_caller() -> None:
    writes = Writes()
    group = GroupCommit(writes.write, max_batch=10)
    writes.gate.clear()
    first = asyncio.create_task(group.submit("a"))
    others = [asyncio.create_task(group.submit(x)) for x in ("b", "bad", "c")]
    async with asyncio.timeout(5):
        while group.waiting < 4:
            await asyncio.sleep(0)
    writes.gate.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)
    assert results[:2] == [None, None]
    assert isinstance(results[2], ValueError)
    assert results[3] is None
    assert writes.batches == [["a"], ["b"], ["c"]]


async def test_a_cancelled_writer_leaves_nobody_waiting() -> None:
    writes = Writes()
    group = GroupCommit(writes.write, max_batch=10)
    writes.gate.clear()
    waiting = [asyncio.create_task(group.submit(x)) for x in "ab"]
    async with asyncio.timeout(5):
        while group.waiting < 2:
            await asyncio.sleep(0)
    assert group._flushing is not None
    group._flushing.cancel()
    for task in waiting:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert writes.batches == []
