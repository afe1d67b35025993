"""Admission control for agent streams (issue 16, item 1).

After a coordinator restart (or a failover) the whole fleet dials at once. Instead of taking
every stream and answering all the Hellos late (each one waiting on the others' store work, so
that agents time out and dial again), the coordinator admits streams at a steady pace and
refuses the excess at once with RESOURCE_EXHAUSTED and a retry hint (`RetryHint.retry_after`,
docs/wire.md "Pushback"). The agents wait out the hint (never less than their own backoff
schedule) plus jitter.

The pace: `rate` new streams per second with bursts of `burst` (a token bucket), and at most
`max_handshakes` streams between their first byte and their Welcome. A refused agent is given
its own later slot: the hints of the refused are spread over the time the bucket needs to admit
them (a virtual queue), so the fleet comes back at the pace the coordinator takes, neither all
at the same moment nor later than needed.

Pure: the caller passes the monotonic time.
"""

from __future__ import annotations

from dataclasses import dataclass

# A slot handed out but unused (the agent never came back) is forgotten after this long.
MAX_AHEAD = 30.0
MIN_HINT = 0.05


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    rate: float = 1000.0
    burst: int = 1000
    max_handshakes: int = 1000


class Admission:
    __slots__ = ("_next_slot", "_settings", "_tokens", "_updated", "handshakes")

    def __init__(self, settings: AdmissionSettings, now: float) -> None:
        self._settings = settings
        self._tokens = float(settings.burst)
        self._updated = now
        # The next free slot of the virtual queue of refused agents (monotonic seconds).
        self._next_slot = now
        self.handshakes = 0

    def admit(self, now: float) -> float | None:
        """None: admitted (call `welcomed` once its handshake ends, either way). Otherwise the
        seconds the agent should wait before it dials again."""
        s = self._settings
        self._tokens = min(float(s.burst), self._tokens + (now - self._updated) * s.rate)
        self._updated = now
        if self._tokens >= 1.0 and self.handshakes < s.max_handshakes:
            self._tokens -= 1.0
            self.handshakes += 1
            return None
        # A slot in the virtual queue: the time by which the bucket will have admitted those
        # refused before this one.
        slot = min(max(self._next_slot, now) + 1.0 / s.rate, now + MAX_AHEAD)
        self._next_slot = slot
        return max(MIN_HINT, slot - now)

    def welcomed(self) -> None:
        """An admitted stream's handshake ended (welcomed, refused or broken)."""
        self.handshakes = max(0, self.handshakes - 1)
