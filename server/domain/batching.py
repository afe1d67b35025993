"""Group commit: many callers' writes in one transaction.

Callers submit an item and wait until it is durable. Items that arrive while a batch is being
written go into the next batch together, so a burst (a fleet-wide revoke's acks, ten thousand
agents saying Hello after a restart) costs a few commits instead of one per item, and a lone
item is written at once (no timer, no added latency)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    future: asyncio.Future[None]


class GroupCommit(Generic[T]):
    def __init__(self, write: Callable[[list[T]], Awaitable[None]], limit: int) -> None:
        """`write` stores a batch in one transaction (all or nothing); `limit` caps a batch."""
        self._write = write
        self._limit = limit
        self._queue: list[_Waiting[T]] = []
        self._writer: asyncio.Task[None] | None = None
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Items submitted and not yet durable."""
        return self._waiting

    async def submit(self, item: T) -> None:
        """Returns once the item's batch is committed; raises what writing the item raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
            self._writer.add_done_callback(self._writer_ended)
        self._waiting += 1
        try:
            await future
        finally:
            self._waiting -= 1

    async def _drain(self) -> None:
        batch: list[_Waiting[T]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
                try:
                    await self._write([w.item for w in batch])
                except Exception as exc:
                    if len(batch) == 1:
                        _settle(batch[0].future, exc)
                    else:
                        # One bad item must not spoil the others: each on its own, so only the
                        # bad one's caller sees the error.
                        log.warning("batch of %d failed (%s); writing them one by one",
                                    len(batch), type(exc).__name__)  # fmt: skip
                        for waiting in batch:
                            try:
                                await self._write([waiting.item])
                            except Exception as one:
                                _settle(waiting.future, one)
                for waiting in batch:
                    _settle(waiting.future, None)
                batch = []
        except BaseException as exc:
            # Cancelled (shutdown): nobody may wait forever.
            for waiting in [*batch, *self._queue]:
                _settle(waiting.future, exc)
            self._queue = []
            raise

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        """A writer cancelled before it even started leaves its items queued: fail them."""
        if self._queue and self._writer is writer:
            error = asyncio.CancelledError() if writer.cancelled() else writer.exception()
            for waiting in self._queue:
                _settle(waiting.future, error or RuntimeError("group commit writer ended"))
            self._queue = []


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
