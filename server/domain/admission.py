"""Admission control for agent streams (issue 16, item 1).

After a coordinator restart (or a failover) the whole fleet dials at once. Instead of taking
every stream and answering all the Hellos late (each one waiting on the others' store work, so
that agents time out and dial again), the coordinator admits streams at a steady pace and
refuses the excess at once with RESOURCE_EXHAUSTED and a retry hint (`RetryHint.retry_after`,
docs/wire.md "Pushback"). The agents wait out the hint (never less than their own backoff
schedule) plus jitter.

The pace: `rate` new streams per second with bursts of `burst` (a token bucket), and at most
`max_handshakes` streams between their first byte and their Welcome. A refused agent is given
its own later slot: the hints of the refused are spread over the time the coordinator needs to
admit them (a virtual queue), so the fleet comes back at the pace the coordinator takes, neither
all at the same moment nor later than needed. That time is the bucket's when the bucket refused;
when the handshakes in flight are at their bound it is the pace at which they end, which by
Little's law is the bound divided by how long a handshake takes now (a moving average of the
last ones). A coordinator slower than `rate` (a replica taking over thousands of agents, on
PostgreSQL) would otherwise hand out slots that come round before it can take their agents, and
each agent would be refused again and again (10,000-agent failover, 2026-12-07: 4,419 refusals
for 5,209 agents moving, the last served after 39 s while the replica was busy less than half of
that time; the agents then also doubled their backoff at each refusal, which they no longer
do). The average follows the handshakes as they end, so a burst after a quiet time starts from
the quiet time's (short) figure: the first refusals of a burst may come back early and be
refused once more, never later than needed.

Pure: the caller passes the monotonic time.
"""

from __future__ import annotations

from dataclasses import dataclass

# A slot handed out but unused (the agent never came back) is forgotten after this long.
MAX_AHEAD = 30.0
MIN_HINT = 0.05
# Weight of the latest handshake in the moving average of their durations.
WEIGHT = 0.02
# The pace assumed for slots is never below this (stalled handshakes would push every hint to
# the bound at once).
MIN_PACE = 20.0


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    rate: float = 1000.0
    burst: int = 1000
    max_handshakes: int = 1000


class Admission:
    __slots__ = ("_duration", "_next_slot", "_settings", "_tokens", "_updated", "handshakes")

    def __init__(self, settings: AdmissionSettings, now: float) -> None:
        self._settings = settings
        self._tokens = float(settings.burst)
        self._updated = now
        # The next free slot of the virtual queue of refused agents (monotonic seconds).
        self._next_slot = now
        self.handshakes = 0
        # Moving average of the handshakes' durations (seconds); none measured yet: 0.
        self._duration = 0.0

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
        # A slot in the virtual queue: the time by which the coordinator will have admitted
        # those refused before this one, at the bucket's rate or, with the handshakes at their
        # bound, at the pace they end.
        pace = s.rate
        if self.handshakes >= s.max_handshakes and self._duration > 0:
            pace = max(MIN_PACE, min(s.rate, s.max_handshakes / self._duration))
        slot = min(max(self._next_slot, now) + 1.0 / pace, now + MAX_AHEAD)
        self._next_slot = slot
        return max(MIN_HINT, slot - now)

    def welcomed(self, admitted: float, now: float) -> None:
        """A handshake admitted at `admitted` ended at `now` (welcomed, refused or broken)."""
        self.handshakes = max(0, self.handshakes - 1)
        took = max(0.0, now - admitted)
        self._duration = (
            took if self._duration == 0 else self._duration + WEIGHT * (took - self._duration)
        )
