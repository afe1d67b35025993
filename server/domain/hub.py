"""In-process change notifications for watchers (request watch, audit tail). Hints only: a
watcher re-reads the store, so a missed or merged notification loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager

from jitmesh.types import AuditEvent


class Hub:
    def __init__(self, queue_size: int = 1000) -> None:
        self._request_watchers: set[asyncio.Queue[str]] = set()
        self._queue_size = queue_size
        self._audit = asyncio.Condition()
        self.audit_head = 0
        # Told of every audit event written by this process, after its commit (metrics count
        # them). Must not raise or block: they run inside the writer's call.
        self.audit_observers: list[Callable[[Sequence[AuditEvent]], None]] = []
        # Called after every commit that wrote audit events (the notify sender's wake-up).
        self.on_audit: list[Callable[[], None]] = []

    def requests_changed(self, request_ids: Iterable[str]) -> None:
        for queue in list(self._request_watchers):
            for rid in request_ids:
                if rid:
                    try:
                        queue.put_nowait(rid)
                    except asyncio.QueueFull:
                        # A watcher that does not keep up gets "everything changed" instead.
                        _drain(queue)
                        queue.put_nowait("*")

    @asynccontextmanager
    async def watch_requests(self) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue(self._queue_size)
        self._request_watchers.add(queue)
        try:
            yield queue
        finally:
            self._request_watchers.discard(queue)

    async def audit_written(self, events: Sequence[AuditEvent]) -> None:
        """Call after a commit with the audit events it wrote."""
        for observe in self.audit_observers:
            observe(events)
        if events and events[-1].seq > self.audit_head:
            self.audit_head = events[-1].seq
            for listener in self.on_audit:
                listener()
            async with self._audit:
                self._audit.notify_all()

    async def audit_advanced(self, seq: int, request_ids: Sequence[str]) -> None:
        """Another replica committed audit events up to `seq`, touching `request_ids` ("*":
        any): wake this replica's watchers as if they were written here."""
        self.requests_changed(request_ids)
        if seq > self.audit_head:
            self.audit_head = seq
            async with self._audit:
                self._audit.notify_all()

    async def wait_audit_after(self, seq: int) -> None:
        async with self._audit:
            await self._audit.wait_for(lambda: self.audit_head > seq)


def _drain(queue: asyncio.Queue[str]) -> None:
    while not queue.empty():
        queue.get_nowait()
