"""When to try a delivery again: doubling delays with jitter, capped, and a last attempt.

Pure: the sender asks, given the attempt number and a random number, when the next try is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.notices import Notice

from .base import DeliveryFailed, Links, Receiver


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first: timedelta = timedelta(seconds=2)
    cap: timedelta = timedelta(minutes=10)
    # 2 s doubling to 10 min, then every ~10 min: 30 attempts reach past four hours.
    attempts: int = 30

    def delay(self, attempt: int, rand: float) -> timedelta:
        """The wait after failed attempt number `attempt` (1 = the first), with "equal jitter":
        between half and all of the doubled delay, so receivers coming back are not hit by
        every coordinator at the same instant, and no wait is ever near zero."""
        if attempt < 1:
            raise ValueError("attempts count from 1")
        full: timedelta = min(self.cap, self.first * (2 ** min(attempt - 1, 30)))
        half = full / 2
        return half + half * min(max(rand, 0.0), 1.0)

    def next_at(self, attempt: int, now: datetime, rand: float) -> datetime | None:
        """When to try again after failed attempt `attempt`; None: give up."""
        if attempt >= self.attempts:
            return None
        return now + self.delay(attempt, rand)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one try did: delivered, or failed (retryable or not) with a short reason."""

    ok: bool
    detail: str = ""
    retryable: bool = True


async def attempt(receiver: Receiver, notice: Notice, links: Links) -> Attempt:
    try:
        await receiver.deliver(notice, links)
    except DeliveryFailed as exc:
        return Attempt(False, exc.detail[:200], exc.retryable)
    return Attempt(True)
