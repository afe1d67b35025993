"""Per-caller rate limits (token buckets) for calls that create state: access requests (per
principal) and enrollment (per peer address, and overall)."""

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
        # caller -> (tokens, when counted, refusing since the last allowed call)
        self._buckets: dict[str, tuple[float, float, bool]] = {}
        # Calls refused so far (the metrics read it).
        self.refused = 0

    def take(self, caller: str) -> None:
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


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (`ipv4:10.0.0.7:51234`, `ipv6:[::1]:51234`),
    without the port: the caller of an unauthenticated call such as enrollment."""
    kind, _, rest = peer.partition(":")
    if kind in {"ipv4", "ipv6"}:
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return host.strip("[]")
    return peer
