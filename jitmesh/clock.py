"""Clocks. Every component takes one; tests pass a `FakeClock` instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told. Sleepers wake when `advance` passes their deadline."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 1000.0
        self._changed = asyncio.Condition()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        deadline = self._mono + max(0.0, seconds)
        async with self._changed:
            await self._changed.wait_for(lambda: self._mono >= deadline)

    async def advance(self, delta: timedelta) -> None:
        """Move both clocks forward and wake the sleepers that are due."""
        self._now += delta
        self._mono += delta.total_seconds()
        async with self._changed:
            self._changed.notify_all()
        # Let woken tasks run before the caller goes on.
        for _ in range(5):
            await asyncio.sleep(0)

    async def jump_wall(self, delta: timedelta) -> None:
        """Move only the wall clock (forwards or backwards), as an NTP step or a bad RTC would."""
        self._now += delta
        async with self._changed:
            self._changed.notify_all()
        await asyncio.sleep(0)


def to_ms(at: datetime) -> int:
    """Aware datetime to integer epoch milliseconds, the stored form of every instant."""
    if at.tzinfo is None:
        raise ValueError("naive datetime")
    return (at - EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
