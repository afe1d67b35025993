"""Expiry: start and end leases on time, from the table (the timers are derived on every pass).

The loop sweeps (start what is due, end what is due), then sleeps until the next deadline, a
change of leases, or at most `MAX_NAP`. An end whose removal fails keeps its lease active and
due, retried after a growing, jittered delay. Beside it runs the retry loop of pending removals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from agent.domain import expiry
from agent.domain.commands import Ack, AckStatus, CommandSpec, GrantSpec, RevokeSpec
from agent.domain.errors import StateError
from agent.domain.leases import EventKind, Lease, LeaseState, OutboxEvent, new_event
from agent.domain.timekeeping import spread
from agent.engine.clocktrust import ClockTrust
from agent.engine.enforcement import Enforcement
from agent.engine.linkstate import LinkState
from agent.engine.reconcile import Reconciler
from agent.engine.removals import Removals
from agent.engine.retention import Retention
from agent.engine.shared import Shared, lease_fields, sleep_or_wake
from agent.store.base import LeaseStore
from jitmesh.clock import Clock

log = logging.getLogger(__name__)

# The expiry loop wakes at least this often, so a wall clock that jumps forward is noticed soon
# (the monotonic clock it otherwise sleeps on cannot see such a jump).
MAX_NAP = 1.0


class Expiry:
    def __init__(
        self,
        *,
        store: LeaseStore,
        clock: Clock,
        shared: Shared,
        time: ClockTrust,
        link: LinkState,
        enforcement: Enforcement,
        removals: Removals,
        reconciler: Reconciler,
        retention: Retention,
        rand: Callable[[], float],
    ) -> None:
        self._store = store
        self._clock = clock
        self._shared = shared
        self._time = time
        self._link = link
        self._enforcement = enforcement
        self._removals = removals
        self._reconciler = reconciler
        self._retention = retention
        self._rand = rand
        # Expiry ends whose removal failed (the lease stays active): the sweep's own retries.
        self._retry_attempt = 0
        # When the last sweep planned to look again (engine time).
        self.next_sweep_at: datetime | None = None
        # Told, for each lease ended by expiry, how many seconds its access outlived its
        # not_after (a slow sweep, a failing removal, an agent that was down): the metrics.
        self.on_overstay: Callable[[float], None] | None = None

    async def run(self) -> None:
        """The expiry loop (sweep, then sleep until the next deadline or a change of leases) and,
        beside it, the loop retrying pending removals in the background and the one pruning
        ended leases."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._removals.run(tasks))
                tasks.create_task(self._retention.run())
                await self._loop()
        except BaseExceptionGroup as group:
            # One failure (a lease table that cannot be read) surfaces as itself, as before.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _loop(self) -> None:
        shared = self._shared
        while True:
            shared.leases_changed.clear()
            # The deadline is absolute (taken before the sweep read the time), so time that
            # passes between the sweep and the start of the sleep is not slept again.
            started = self._clock.monotonic()
            try:
                delay = await self.sweep()
                # Drift: compare the host with the table now and then, not only at start
                # (after the sweep, so expired access is never brought back).
                until_reconcile = await self._reconciler.when_due(started)
                if until_reconcile is not None:
                    delay = min(delay, until_reconcile)
            except StateError as exc:
                # A full or failing disk: the sweep removes access before it records the end, so
                # expiry is still enforced; the records are tried again shortly, and the agent
                # keeps running rather than crash (and crash again at every start).
                log.error("expiry sweep cannot persist", extra={"error": str(exc)})
                delay = min(MAX_NAP, self._removals.policy.base)
                # No plan: every command wakes the loop until a sweep makes one again.
                self.next_sweep_at = None
            await sleep_or_wake(self._clock, started + delay, shared.leases_changed)

    def must_look(self, command: CommandSpec, ack: Ack) -> bool:
        """Whether the expiry loop must sweep before the wake it planned. Not for a grant that
        was applied (or scheduled) and whose start and end both lie beyond that wake: the usual
        case, where a sweep after every command would cost a table read and task churn on the
        push path for nothing. Nor for a revoke that was applied: a lease that ended makes no
        other one due sooner (each is due by its own times and the link's offline time), so the
        planned wake still comes first. Always for anything else."""
        kind = command.kind
        planned = self.next_sweep_at
        if planned is not None and ack.status is AckStatus.APPLIED and isinstance(kind, RevokeSpec):
            return False
        if (
            planned is None
            or ack.status is not AckStatus.APPLIED
            or not isinstance(kind, GrantSpec)
        ):
            return True
        now = self._time.now()
        next_deadline = kind.not_before if kind.not_before > now else kind.not_after
        return next_deadline <= planned

    async def sweep(self) -> float:
        """Start and end what is due; returns the seconds until the next sweep is needed."""
        async with self._shared.lock:
            return await self.sweep_locked(while_down=False)

    async def sweep_locked(self, *, while_down: bool) -> float:
        now = self._time.now()
        active = await self._store.active_leases()
        due = expiry.due(active, now, self._link.offline_since)
        # A pair whose removal runs in the background waits for it (the loop is woken when it
        # ends): an apply or remove now could cross it.
        busy = set(self._removals.removing)
        starts = [lease for lease in due.starts if lease.pair not in busy]
        ends = [(lease, cause) for lease, cause in due.ends if lease.pair not in busy]
        waiting = {lease.grant_id for lease in due.starts if lease.pair in busy}
        waiting |= {lease.grant_id for lease, _ in due.ends if lease.pair in busy}
        failures = await self._enforcement.enforce(
            [lease for lease in active if lease.holds],
            starting=starts,
            ending=[lease for lease, _ in ends],
            cause=_cause(ends),
        )
        events = False
        for lease in starts:
            reason = failures.apply.get(lease.pair)
            if reason is None:
                event = new_event(EventKind.GRANT_APPLIED, at=now, lease=lease)
                events |= await self._store.mark_applied(lease.grant_id, now, event)
                log.info("scheduled grant applied", extra=lease_fields(lease))
            else:
                event = new_event(
                    EventKind.GRANT_APPLY_FAILED, at=now, lease=lease, details={"reason": reason}
                )
                events |= await self._store.mark_failed(lease.grant_id, now, reason, event)
        stuck: set[str] = set()
        for lease, cause in ends:
            if lease.holds and lease.pair in failures.remove:
                # Still in force: the lease stays active (and due) until removal succeeds.
                stuck.add(lease.grant_id)
                continue
            events |= await self._store.end_lease(
                lease.ended(at=now, reason=cause.value), _end_event(lease, cause, now, while_down)
            )
            if cause is expiry.EndCause.EXPIRED and self.on_overstay is not None:
                self.on_overstay(max(0.0, (now - lease.not_after).total_seconds()))
            log.info(
                "grant expired" if cause is expiry.EndCause.EXPIRED else "grant ended offline",
                extra=lease_fields(lease),
            )
        if events:
            self._shared.outbox_changed.set()
        await self._time.note_wall_if_due(now)

        active = await self._store.active_leases()
        remaining = [lease for lease in active if lease.grant_id not in stuck | waiting]
        wake = expiry.next_wakeup(remaining, self._link.offline_since)
        delay = MAX_NAP if wake is None else min(MAX_NAP, (wake - now).total_seconds())
        if stuck:
            # Removals keep failing: try again after a growing, jittered delay (not in a spin).
            policy = self._removals.policy
            retry = policy.base * 2.0 ** min(self._retry_attempt, 16)
            delay = min(delay, spread(min(policy.cap, retry), rand=self._rand()))
            self._retry_attempt += 1
        else:
            self._retry_attempt = 0
        delay = max(0.0, delay)
        self.next_sweep_at = now + timedelta(seconds=delay)
        return delay

    async def end_now(self, grant_id: str, reason: str) -> bool:
        """End one active lease now, on the host's side (`exec --release`: access ends with the
        action). Always the safe direction: it only ever takes access away. False if the lease
        is not active."""
        async with self._shared.lock:
            lease = await self._store.lease(grant_id)
            if lease is None or lease.state is not LeaseState.ACTIVE:
                return False
            now = self._time.now()
            holding = await self._enforcement.holding([lease.pair])
            failures = await self._enforcement.enforce(holding, ending=[lease], cause=reason)
            await self._store.end_lease(
                lease.ended(at=now, reason=reason),
                new_event(EventKind.GRANT_REMOVED, at=now, lease=lease, details={"reason": reason}),
            )
            if lease.pair in failures.remove:
                await self._removals.pend(lease.pair, [grant_id], failures.remove[lease.pair])
            self._shared.outbox_changed.set()
            self._shared.leases_changed.set()
            log.info("grant ended on the host", extra={**lease_fields(lease), "reason": reason})
            return True

    async def end_everything(self, *, reason: str, event: OutboxEvent) -> None:
        """Fail closed: end every active lease and take its access away (under the lock)."""
        now = self._time.now()
        active = await self._store.active_leases()
        failures = await self._enforcement.enforce(
            [lease for lease in active if lease.holds], ending=active, cause=reason
        )
        for lease in active:
            await self._store.end_lease(
                lease.ended(at=now, reason=reason),
                new_event(EventKind.GRANT_REMOVED, at=now, lease=lease, details={"reason": reason}),
            )
        for pair, error in sorted(failures.remove.items()):
            await self._removals.pend(
                pair, [lease.grant_id for lease in active if lease.pair == pair], error
            )
        await self._store.add_event(event)
        self._shared.outbox_changed.set()


def _cause(ends: list[tuple[Lease, expiry.EndCause]]) -> str:
    """Why the access that `ends` take away ended, for those told (expired, unless every one
    ended for being offline too long)."""
    offline = ends and all(cause is expiry.EndCause.OFFLINE for _, cause in ends)
    return "offline" if offline else "expired"


def _end_event(
    lease: Lease, cause: expiry.EndCause, now: datetime, while_down: bool
) -> OutboxEvent:
    details = {"while": "down"} if while_down else {}
    if cause is expiry.EndCause.OFFLINE:
        details["reason"] = "offline"
        return new_event(EventKind.GRANT_REMOVED, at=now, lease=lease, details=details)
    return new_event(EventKind.GRANT_EXPIRED, at=now, lease=lease, details=details)
