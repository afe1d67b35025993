"""Clocks. Every component takes one; tests pass a `FakeClock` instead of sleeping.

Also the one way an instant is written for programs (`rfc3339`) and the stored precision
(`whole_ms`, `MillisecondClock`): instants are kept as whole epoch milliseconds, so a value handed
back at once equals the same value read back later."""

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


class MillisecondClock:
    """`inner`, its wall-clock time cut to whole milliseconds: what the coordinator stores, so
    what it returns at once (a grant from approve) equals what it reads back later."""

    def __init__(self, inner: Clock) -> None:
        self.inner = inner

    def now(self) -> datetime:
        return whole_ms(self.inner.now())

    def monotonic(self) -> float:
        return self.inner.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def whole_ms(at: datetime) -> datetime:
    """`at` cut to whole milliseconds (the stored precision), in UTC."""
    if at.tzinfo is UTC:
        # The same instant as from_ms(to_ms(at)) with fewer objects: every `now` of the
        # coordinator comes here (once per command a stream writer signs: MillisecondClock.now
        # 2.1 -> 0.9 us). The epoch and whole seconds are whole milliseconds, so flooring the
        # instant to a millisecond drops the microsecond field's sub-millisecond digits, before
        # 1970 too. (`replace(microsecond=...)` costs twice this subtraction.)
        return at - timedelta(0, 0, at.microsecond % 1000)
    return from_ms(to_ms(at))


def rfc3339(at: datetime) -> str:
    """The one text form of an instant for programs (JSON of jitctl, webhooks, logs):
    RFC 3339 in UTC with exactly three fraction digits, `2026-01-01T12:00:00.000Z`, so that
    texts sort as the instants do."""
    if at.tzinfo is None:
        raise ValueError("naive datetime")
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def to_ms(at: datetime) -> int:
    """Aware datetime to integer epoch milliseconds, the stored form of every instant."""
    if at.tzinfo is None:
        raise ValueError("naive datetime")
    return (at - EPOCH) // _MILLISECOND


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
