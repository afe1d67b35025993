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


class Answers:
    """What `enqueue_all` answered, in order."""

    def __init__(self, writes: Writes) -> None:
        self.writes = writes
        self.got: list[BaseException | None] = []
        # How many batches were written when each answer came.
        self.after: list[int] = []
        self.changed = asyncio.Event()

    def __call__(self, failure: BaseException | None) -> None:
        self.got.append(failure)
        self.after.append(len(self.writes.batches))
        self.changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()


async def test_a_group_is_answered_once_after_its_last_item_is_written() -> None:
    writes = Writes()
    group = GroupCommit(writes.write, max_batch=2)
    writes.gate.clear()
    first, second = Answers(writes), Answers(writes)
    group.enqueue_all(["a", "b", "c"], first)
    group.enqueue_all(["d"], second)
    assert group.waiting == 4
    writes.gate.set()
    await first.wait(1)
    await second.wait(1)
    # Split over two commits, answered after the second, once.
    assert writes.batches == [["a", "b"], ["c", "d"]]
    assert first.got == [None]
    assert first.after == [2]
    assert second.got == [None]
    assert group.waiting == 0


async def test_a_group_gets_its_first_failure_and_the_others_are_still_written() -> None:
    writes = Writes()
    group = GroupCommit(writes.write, max_batch=10)
    writes.gate.clear()
    mixed, clean = Answers(writes), Answers(writes)
    alone = asyncio.create_task(group.submit("x"))
    async with asyncio.timeout(5):
        while group.waiting < 1:
            await asyncio.sleep(0)
    group.enqueue_all(["a", "bad", "b"], mixed)
    group.enqueue_all(["c"], clean)
    writes.gate.set()
    await alone
    await mixed.wait(1)
    await clean.wait(1)
    assert len(mixed.got) == 1
    assert isinstance(mixed.got[0], ValueError)
    assert clean.got == [None]
    # The failed batch is written again one by one: only the bad item is left out.
    assert writes.batches == [["x"], ["a"], ["b"], ["c"]]
    assert group.waiting == 0


async def test_a_cancelled_writer_answers_a_group_with_cancelled() -> None:
    writes = Writes()
    group = GroupCommit(writes.write, max_batch=10)
    writes.gate.clear()
    answers = Answers(writes)
    group.enqueue_all(["a", "b"], answers)
    assert group._flushing is not None
    await asyncio.sleep(0)
    group._flushing.cancel()
    await answers.wait(1)
    assert len(answers.got) == 1
    assert isinstance(answers.got[0], asyncio.CancelledError)
    assert group.waiting == 0
    assert writes.batches == []
