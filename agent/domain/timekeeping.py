"""The agent's notion of "now" for ending leases, and backoff delays."""

from __future__ import annotations

from datetime import datetime, timedelta


class FailClosedTime:
    """Now, as the later of the wall clock, the monotonic clock and every earlier answer.

    The monotonic clock is anchored to the wall clock when the agent starts (and to the last
    instant persisted before a restart, if that is later). Whichever clock says later wins, so a
    wall clock that jumps or runs backwards can end a grant early but never extend one.
    """

    def __init__(self, *, wall: datetime, mono: float, floor: datetime | None = None) -> None:
        self._anchor_wall = wall if floor is None else max(wall, floor)
        self._anchor_mono = mono
        self._high = self._anchor_wall

    def now(self, *, wall: datetime, mono: float) -> datetime:
        by_mono = self._anchor_wall + timedelta(seconds=mono - self._anchor_mono)
        self._high = max(self._high, wall, by_mono)
        return self._high

    def raise_to(self, at: datetime, *, mono: float) -> None:
        """Move "now" forward to `at` (a trusted time, e.g. the coordinator's), never back."""
        if at > self._high:
            self._anchor_wall = at
            self._anchor_mono = mono
            self._high = at


def full_jitter(attempt: int, *, base: float, cap: float, rand: float) -> float:
    """Delay before reconnect number `attempt` (0 first): uniform in [0, min(cap, base * 2^n)).

    "Full jitter" spreads a fleet that lost its coordinator at the same moment, so the agents do
    not all come back at once. `rand` is a sample in [0, 1).
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return max(0.0, rand * ceiling)


def spread(delay: float, *, rand: float, fraction: float = 0.5) -> float:
    """`delay` moved by up to +-`fraction` of itself, for retries that should not line up."""
    return max(0.0, delay * (1.0 + fraction * (2.0 * rand - 1.0)))
