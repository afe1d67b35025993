"""Clock trust: the engine's "now", and whether its clock may be believed for new grants.

"Now" never runs backwards and never behind the coordinator's time (`FailClosedTime`). A wall
clock found behind the last time recorded (at start) is untrusted until a Welcome brings the
coordinator's time; a clock further from the coordinator's than the tolerance (at a Welcome)
refuses grants until a Welcome agrees again. Both are audited.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from agent.domain.commands import CommandSpec
from agent.domain.leases import EventKind, new_event
from agent.domain.timekeeping import FailClosedTime
from agent.engine.shared import Shared, best_effort
from agent.store.base import LeaseStore, Meta
from jitmesh.clock import Clock, rfc3339

log = logging.getLogger(__name__)

# How often the expiry loop persists the wall time reached (the floor after a restart).
WALL_NOTE_EVERY = timedelta(seconds=10)
# A wall clock this much behind the last recorded time at start is not yet "untrusted" (the time
# is recorded as the agent runs, a little ahead of a clean stop).
CLOCK_SLACK = timedelta(seconds=1)


class ClockTrust:
    def __init__(
        self,
        *,
        store: LeaseStore,
        clock: Clock,
        shared: Shared,
        skew_tolerance: timedelta | None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._shared = shared
        self.skew = skew_tolerance
        self._time: FailClosedTime | None = None
        self._wall_noted_at: datetime | None = None
        # Set at start when the wall clock is behind the last recorded time; cleared by the
        # coordinator's time in a Welcome. While set, grants are refused.
        self.untrusted = False
        # Set while the last Welcome showed the agent's clock further from the coordinator's
        # than the tolerance: grants are refused (and audited) until a Welcome agrees again.
        self.skewed = False

    @property
    def started(self) -> bool:
        return self._time is not None

    def now(self) -> datetime:
        if self._time is None:
            raise RuntimeError("the engine has not started")
        return self._time.now(wall=self._clock.now(), mono=self._clock.monotonic())

    def start(self, meta: Meta) -> datetime:
        """Anchor "now" at start (never before the last time recorded); returns the wall time
        read. Sets `untrusted` when the wall clock went back while the agent was down."""
        wall = self._clock.now()
        if meta.last_wall_at is not None and meta.last_wall_at > wall + CLOCK_SLACK:
            # The clock went back while the agent was down (a bad RTC, a reboot with a wrong
            # clock): no lease deadline can be trusted. Everything managed goes; new grants wait
            # for the coordinator's time.
            log.warning("wall clock is behind the last time seen: clock untrusted")
            self.untrusted = True
        self._time = FailClosedTime(
            wall=wall, mono=self._clock.monotonic(), floor=meta.last_wall_at
        )
        return wall

    async def coordinator_time_seen(self, at: datetime) -> None:
        """The coordinator's clock (from a Welcome): time never runs behind it, and a clock
        found untrusted at start is trusted again."""
        if self._time is None:
            return
        # Skew: the agent's wall clock against the coordinator's, at every Welcome. A clock behind
        # is corrected (time never runs behind the coordinator's, and runs on the monotonic clock
        # from there); a clock ahead cannot be (time never goes back), so grants are refused
        # until a Welcome agrees again. Both are audited.
        wall = self._clock.now()
        skew_ms = int((wall - at).total_seconds() * 1000)
        self._time.raise_to(at, mono=self._clock.monotonic())
        was = self.skewed
        self.skewed = self.skew is not None and self.now() - at > self.skew
        if self.skew is not None and abs(wall - at) > self.skew:
            with best_effort("a clock event"):
                await self._store.add_event(
                    new_event(
                        EventKind.CLOCK_SKEWED,
                        at=self.now(),
                        details={"skew_ms": str(skew_ms), "refusing": str(self.skewed).lower()},
                    )
                )
            self._shared.outbox_changed.set()
            log.warning("clock skew", extra={"skew_ms": skew_ms, "refusing": self.skewed})
        elif was and not self.skewed:
            with best_effort("a clock event"):
                await self._store.add_event(
                    new_event(
                        EventKind.CLOCK_TRUSTED, at=self.now(), details={"skew_ms": str(skew_ms)}
                    )
                )
            self._shared.outbox_changed.set()
        if self.untrusted:
            self.untrusted = False
            with best_effort("the trusted clock"):
                await self._store.note_wall(self.now())
                await self._store.add_event(
                    new_event(
                        EventKind.CLOCK_TRUSTED,
                        at=self.now(),
                        details={"coordinator": rfc3339(at)},
                    )
                )
            self._shared.outbox_changed.set()
            log.info("clock trusted again: coordinator time seen")

    def grant_problem(self, command: CommandSpec, now: datetime) -> str | None:
        """Why a grant must be refused for the state of the clock (None: it need not be)."""
        if self.untrusted:
            return "agent clock untrusted"
        if self.skewed:
            return "clock skew beyond tolerance"
        # Issued "in the future": the agent's clock is behind the coordinator's, and its view of
        # the grant's window would last too long. (Issued long ago is not skew: a command can wait
        # in a queue or a stalled connection; an agent clock ahead only ends grants early.)
        skew = self.skew
        if skew is not None and command.issued_at is not None and command.issued_at - now > skew:
            return "clock skew beyond tolerance"
        return None

    async def note_wall_if_due(self, now: datetime) -> None:
        """Persist the time reached now and then (raises StateError: the sweep's caller logs)."""
        if self._wall_noted_at is None or now - self._wall_noted_at >= WALL_NOTE_EVERY:
            await self._store.note_wall(now)
            self._wall_noted_at = now
