"""Per-caller rate limits (token buckets) for calls that create state, such as access requests."""

from __future__ import annotations

from collections.abc import Callable

from server.domain import errors

MAX_CALLERS = 10_000


class RateLimiter:
    """`burst` calls at once, then `rate` per second, per caller name. Refusals raise
    `RateLimited` (RESOURCE_EXHAUSTED on the wire)."""

    def __init__(self, rate: float, burst: int, monotonic: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._now = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: str) -> None:
        now = self._now()
        tokens, at = self._buckets.get(caller, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            raise errors.RateLimited("too many requests; slow down")
        if len(self._buckets) >= MAX_CALLERS and caller not in self._buckets:
            # Callers are authenticated principals, so this stays small; bound it anyway.
            self._buckets.clear()
        self._buckets[caller] = (tokens - 1.0, now)
