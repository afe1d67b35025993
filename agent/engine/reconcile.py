"""Reconcile: make the host match the lease table (at start, and every `reconcile_every` seconds
while running, after the sweep so expired access is never brought back).

What active leases hold but an enforcer does not show is applied; what an enforcer shows that no
active lease holds (drift) is removed, or for a report-only enforcer audited once and left. Pairs
with a removal owed are the retry loop's, not drift.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from agent.domain.coverage import DriftMode, covers, held_pairs, reconcile
from agent.domain.errors import EnforcerError
from agent.domain.leases import EventKind, Pair, new_event
from agent.enforcers.base import EnforcerSet
from agent.engine.removals import Removals
from agent.engine.shared import Shared, lease_fields
from agent.store.base import LeaseStore
from jitmesh.clock import Clock

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        *,
        store: LeaseStore,
        enforcers: EnforcerSet,
        clock: Clock,
        shared: Shared,
        removals: Removals,
        now: Callable[[], datetime],
        every: float | None,
    ) -> None:
        self._store = store
        self._enforcers = enforcers
        self._shared = shared
        self._removals = removals
        self._now = now
        # Seconds between drift reconciles while running (None: only at start).
        self.every = every
        self._reconciled_at = clock.monotonic()
        # Report-only drift already audited, by (enforcer, pair), until it is gone.
        self._drift_reported: set[tuple[str, Pair]] = set()

    async def adopt_applied(self) -> None:
        """A crash between an apply and its record leaves access in force for a lease the table
        still shows as not applied: record it as applied instead of applying it a second time.
        (At start, under the lock.)"""
        now = self._now()
        waiting = [
            lease
            for lease in await self._store.active_leases()
            if lease.applied_at is None and lease.allows(now)
        ]
        if not waiting or not self._enforcers.enforcers:
            return
        seen: set[Pair] | None = None
        for enforcer in self._enforcers.enforcers:
            try:
                observed = await self._enforcers.observe_one(enforcer)
            except EnforcerError:
                return  # cannot see: apply again (idempotent) rather than guess
            seen = observed if seen is None else seen & observed
        for lease in waiting:
            if seen and lease.pair in seen:
                await self._store.mark_applied(lease.grant_id, now)
                log.info("found applied at start", extra=lease_fields(lease))

    async def when_due(self, started: float) -> float | None:
        """The periodic reconcile, if it is due at monotonic time `started` (taking the lock);
        returns the seconds until the next one (None: no periodic reconcile)."""
        if self.every is None:
            return None
        if started - self._reconciled_at >= self.every:
            self._reconciled_at = started
            await self.reconcile()
        return max(0.0, self._reconciled_at + self.every - started)

    async def reconcile(self) -> None:
        """Compare the host with the lease table now (drift)."""
        async with self._shared.lock:
            await self.reconcile_locked()

    async def reconcile_locked(self) -> None:
        """Make each enforcer's view match the table: apply what active leases hold but the
        enforcer does not show; remove (or, for a report-only enforcer, audit) what it shows that
        no active lease holds. Pairs with a pending removal are the retry loop's, not drift."""
        now = self._now()
        active = await self._store.active_leases()
        desired = held_pairs(active)
        windows = covers(lease for lease in active if lease.holds)
        owed = self._removals.owed()
        broken: dict[Pair, str] = {}
        events = False
        for enforcer, mode in zip(self._enforcers.enforcers, self._enforcers.drift, strict=True):
            try:
                observed = await self._enforcers.observe_one(enforcer)
            except EnforcerError as exc:
                # Cannot see: re-apply everything (idempotent), remove nothing.
                log.warning("observe failed", extra={"enforcer": enforcer.name, "error": str(exc)})
                observed = set()
            plan = reconcile(desired, observed)
            for subject, action in sorted(plan.apply - broken.keys()):
                try:
                    await self._enforcers.apply_one(enforcer, windows[(subject, action)])
                except EnforcerError as exc:
                    broken[(subject, action)] = str(exc)
                    continue
                log.info(
                    "reconcile applied",
                    extra={"enforcer": enforcer.name, "subject": subject, "action": action},
                )
            drift = plan.remove - owed
            if mode is DriftMode.REPORT:
                events |= await self._report_drift(enforcer.name, drift, now)
                continue
            for subject, action in sorted(drift):
                try:
                    await self._enforcers.remove_one(enforcer, (subject, action))
                except EnforcerError as exc:
                    await self._removals.pend((subject, action), (), str(exc))
                    continue
                events = True
                await self._store.add_event(
                    new_event(
                        EventKind.DRIFT_REMOVED,
                        at=now,
                        pair=(subject, action),
                        details={"enforcer": enforcer.name},
                    )
                )
                log.warning(
                    "reconcile removed access no lease holds",
                    extra={"enforcer": enforcer.name, "subject": subject, "action": action},
                )
        # All or nothing: a pair one enforcer cannot apply is taken away from all of them, and
        # the leases that held it have failed.
        for pair, reason in sorted(broken.items()):
            try:
                await self._enforcers.remove(pair)
            except EnforcerError as exc:
                await self._removals.pend(pair, (), str(exc))
            for lease in active:
                if lease.holds and lease.pair == pair:
                    event = new_event(
                        EventKind.GRANT_APPLY_FAILED,
                        at=now,
                        lease=lease,
                        details={"reason": reason, "while": "reconcile"},
                    )
                    events |= await self._store.mark_failed(lease.grant_id, now, reason, event)
        if events:
            self._shared.outbox_changed.set()

    async def _report_drift(self, enforcer: str, drift: frozenset[Pair], now: datetime) -> bool:
        """Report-only drift: audit each pair once (until it is gone), change nothing."""
        known = {pair for name, pair in self._drift_reported if name == enforcer}
        self._drift_reported -= {(enforcer, pair) for pair in known - drift}
        new = sorted(drift - known)
        for subject, action in new:
            await self._store.add_event(
                new_event(
                    EventKind.DRIFT_REPORTED,
                    at=now,
                    pair=(subject, action),
                    details={"enforcer": enforcer},
                )
            )
            self._drift_reported.add((enforcer, (subject, action)))
            log.warning(
                "reconcile found access no lease holds (report only: left in place)",
                extra={"enforcer": enforcer, "subject": subject, "action": action},
            )
        return bool(new)
