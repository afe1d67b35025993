"""Group commit: concurrent callers' writes coalesced into one store transaction.

Callers that arrive while a batch is being written wait for the next one, so under load each
transaction (and each worker-thread hop of the store) carries many callers' writes, and with no
load a caller is written at once, alone. Each caller gets its own result or error: the write
function answers per item, and a batch that fails as a whole is written again one item at a time,
so a bad item fails only itself. A caller's result is set only after the transaction committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Items per transaction: bounds how long one batch holds the writer.
MAX_BATCH = 256

# Called once for a group of items (`GroupCommit.enqueue_all`): None once all are durable,
# else the first failure (CancelledError when the writer was cancelled before they were).
Answer = Callable[[BaseException | None], None]


class _Group:
    """Items enqueued together and answered once (`enqueue_all`)."""

    __slots__ = ("answer", "left")

    def __init__(self, left: int, answer: Answer) -> None:
        self.left = left
        self.answer = answer

    def settle(self, result: object) -> None:
        if self.left <= 0:
            return  # answered already, with an earlier item's failure
        if isinstance(result, BaseException):
            self.left = 0
            self.answer(result)
            return
        self.left -= 1
        if self.left == 0:
            self.answer(None)


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]],
        max_batch: int = MAX_BATCH,
        *,
        skip_abandoned: bool = False,
    ) -> None:
        """`write` stores the items in one transaction and answers each, in order, with its
        result or the exception that item alone gets. With `skip_abandoned`, an item whose
        caller is gone before its batch is written (the call cancelled: its deadline passed,
        the client left) is not written at all: the caller was told it failed, and may ask
        again."""
        self._write = write
        self._max_batch = max_batch
        self._skip_abandoned = skip_abandoned
        self._pending: list[tuple[T, asyncio.Future[R] | _Group]] = []
        self._flushing: asyncio.Future[None] | None = None
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Items submitted and not yet answered (for tests and metrics)."""
        return self._waiting

    async def submit(self, item: T) -> R:
        return await self.enqueue(item)

    def enqueue(self, item: T) -> asyncio.Future[R]:
        """Submit without waiting: the future is answered after the item's commit. Items are
        written in the order they are submitted or enqueued."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting += 1
        future.add_done_callback(self._answered)
        self._pending.append((item, future))
        self._start()
        return future

    def enqueue_all(self, items: Sequence[T], answer: Answer) -> None:
        """Submit `items` in order without a future each: `answer` is called once, by the
        writer, with None after the last one's commit, or with the first failure (the others
        are still written). For callers that need only "all durable, or not": a stream's
        reader recording its acks made a future, two callbacks and two event-loop turns per
        ack. `answer` must not raise."""
        if not items:
            answer(None)
            return
        group = _Group(len(items), answer)
        self._waiting += len(items)
        self._pending.extend((item, group) for item in items)
        self._start()

    def _start(self) -> None:
        if self._flushing is None or self._flushing.done():
            # The writer is a task of its own, owned here and awaited by `close`: a caller
            # that is cancelled (its RPC ended) must not cancel the others' batch.
            self._flushing = asyncio.ensure_future(self._flush())
            self._flushing.add_done_callback(self._flush_ended)

    def _answered(self, _: asyncio.Future[R]) -> None:
        self._waiting -= 1

    def _flush_ended(self, flushing: asyncio.Future[None]) -> None:
        """A writer cancelled before it even started leaves its items pending: cancel them."""
        if flushing is self._flushing:
            self._cancel(self._pending)
            self._pending.clear()

    def _cancel(self, entries: list[tuple[T, asyncio.Future[R] | _Group]]) -> None:
        for _, target in entries:
            if isinstance(target, _Group):
                self._waiting -= 1
                target.settle(asyncio.CancelledError())
            elif not target.done():
                target.cancel()

    async def close(self) -> None:
        """Wait for the batches already submitted."""
        if self._flushing is not None:
            await self._flushing

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R] | _Group]] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if self._skip_abandoned:
                    # A group has no caller to leave: its items are always written.
                    batch = [
                        (item, target)
                        for item, target in batch
                        if isinstance(target, _Group) or not target.done()
                    ]
                    if not batch:
                        continue
                items = [item for item, _ in batch]
                try:
                    results = list(await self._write(items))
                except Exception as exc:
                    if len(batch) == 1:
                        results = [exc]
                    else:
                        # Something in the batch failed the whole transaction: each alone.
                        results = [await self._one(item) for item in items]
                for (_, target), result in zip(batch, results, strict=True):
                    if isinstance(target, _Group):
                        self._waiting -= 1
                        target.settle(result)
                    elif target.done():  # the caller is gone
                        continue
                    elif isinstance(result, Exception):
                        target.set_exception(result)
                    else:
                        target.set_result(result)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody is left waiting forever.
            self._cancel(batch + self._pending)
            self._pending.clear()
            raise

    async def _one(self, item: T) -> R | Exception:
        try:
            return (await self._write([item]))[0]
        except Exception as exc:
            return exc
