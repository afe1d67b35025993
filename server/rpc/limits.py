"""Per-caller rate limits (token buckets) for calls that create state: access requests (per
principal) and enrollment (per peer address, and overall).

One SQLite coordinator keeps its buckets in memory (`RateLimiter`). Replicas on PostgreSQL keep
them in the store (`SharedRateLimiter`): a caller spreading calls over every replica gets the
limit once, not once per replica."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from jitmesh.clock import Clock
from server.domain import errors

MAX_CALLERS = 10_000
# A shared limiter deletes the buckets full again once every this many calls (bounded storage).
PRUNE_EVERY = 1000


class Limiter(Protocol):
    # Calls refused so far by this process (the metrics read it).
    refused: int

    async def take(self, caller: str) -> None:
        """Take one call from `caller`'s budget, or raise `RateLimited`."""
        ...


class Buckets(Protocol):
    """The store's side of a shared limiter (`server.domain.ports.Store`)."""

    async def take_token(
        self, limiter: str, caller: str, rate: float, burst: int, at: datetime
    ) -> int: ...

    async def forget_full_buckets(self, limiter: str, at: datetime) -> int: ...


class RateLimiter:
    """`burst` calls at once, then `rate` per second, per caller name. Refusals raise
    `RateLimited` (RESOURCE_EXHAUSTED on the wire)."""

    def __init__(self, rate: float, burst: int, monotonic: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._now = monotonic
        # caller -> (tokens, when counted, refusing since the last allowed call)
        self._buckets: dict[str, tuple[float, float, bool]] = {}
        # Calls refused so far (the metrics read it).
        self.refused = 0

    async def take(self, caller: str) -> None:
        now = self._now()
        tokens, at, refusing = self._buckets.get(caller, (self._burst, now, False))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now, True)
            self.refused += 1
            raise errors.RateLimited("too many requests; slow down", first=not refusing)
        if len(self._buckets) >= MAX_CALLERS and caller not in self._buckets:
            # Bounded memory: with peer addresses as callers a flood from many addresses could
            # grow it; forgetting everyone refills their buckets, which the overall limit caps.
            self._buckets.clear()
        self._buckets[caller] = (tokens - 1.0, now, False)


class SharedRateLimiter:
    """`burst` calls at once, then `rate` per second, per caller name, counted in the store
    that every replica shares (one statement per call). Time is the wall clock (shared by
    hosts, unlike a monotonic one); a replica whose clock runs behind refills nothing."""

    def __init__(self, name: str, rate: float, burst: int, buckets: Buckets, clock: Clock) -> None:
        self._name = name
        self._rate = rate
        self._burst = burst
        self._buckets = buckets
        self._clock = clock
        self._calls = 0
        self.refused = 0

    async def take(self, caller: str) -> None:
        now = self._clock.now()
        refusals = await self._buckets.take_token(self._name, caller, self._rate, self._burst, now)
        self._calls += 1
        if self._calls % PRUNE_EVERY == 0:
            await self._buckets.forget_full_buckets(self._name, now)
        if refusals:
            self.refused += 1
            raise errors.RateLimited("too many requests; slow down", first=refusals == 1)


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (`ipv4:10.0.0.7:51234`, `ipv6:[::1]:51234`),
    without the port: the caller of an unauthenticated call such as enrollment."""
    kind, _, rest = peer.partition(":")
    if kind in {"ipv4", "ipv6"}:
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return host.strip("[]")
    return peer
