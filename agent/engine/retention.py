"""Retention: ended leases leave the lease table once kept long enough (agent.domain.retention
decides which; this part pages through the ended rows now and then and deletes those)."""

from __future__ import annotations

import logging
from datetime import timedelta

from agent import defaults
from agent.domain import retention
from agent.domain.errors import StateError
from agent.engine.clocktrust import ClockTrust
from agent.engine.shared import Shared
from agent.store.base import LeaseStore
from jitmesh.clock import Clock

log = logging.getLogger(__name__)

PAGE = 500


class Retention:
    def __init__(
        self,
        *,
        store: LeaseStore,
        clock: Clock,
        shared: Shared,
        time: ClockTrust,
        keep: timedelta,
        every: float = defaults.PRUNE_EVERY,
    ) -> None:
        """`keep`: how long every ended row stays at least (`lease_retention`); rows that
        refuse a late grant stay longer (agent.domain.retention). `every`: seconds between
        passes (on `clock`'s monotonic time)."""
        self._store = store
        self._clock = clock
        self._shared = shared
        self._time = time
        self._keep = keep
        self._every = every

    async def run(self) -> None:
        """A pass now, then one every `every` seconds."""
        while True:
            try:
                await self.prune()
            except StateError as exc:
                # A full or failing disk: deleting can wait for the next pass.
                log.warning("ended leases not pruned", extra={"error": str(exc)})
            await self._clock.sleep(self._every)

    async def prune(self) -> int:
        """Delete the ended rows kept long enough; how many. Nothing while the clock is not
        believed (untrusted at start, or skewed from the coordinator's): a clock run ahead must
        not drop a tombstone early."""
        if self._time.untrusted or self._time.skewed:
            return 0
        # Without a skew check (tests, or turned off) the default tolerance still bounds it.
        skew = self._time.skew or timedelta(seconds=defaults.SKEW_TOLERANCE)
        deleted, after = 0, ""
        while True:
            async with self._shared.lock:
                now = self._time.now()
                page = await self._store.ended_leases(after=after, limit=PAGE)
                gone = [
                    lease.grant_id
                    for lease in page
                    if retention.prunable(lease, now, retention=self._keep, skew_tolerance=skew)
                ]
                deleted += await self._store.delete_ended(gone)
            if len(page) < PAGE:
                break
            after = page[-1].grant_id
        if deleted:
            log.info("ended leases pruned", extra={"count": deleted})
        return deleted
