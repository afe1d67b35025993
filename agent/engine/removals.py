"""Removal retries: pairs whose removal failed after their lease had already ended.

A removal that fails after its lease ended (a revoke, a snapshot, a fail-closed start, drift)
becomes a pending removal (`agent.domain.removals`), persisted with its attempts and next retry
time. The retry loop runs each due one as its own background task, with the hook outside the
engine lock. A retry that succeeds reports the grants removed (`grant.removed`, retried=true: the
coordinator moves them to REVOKED); when the attempts run out they are reported
`grant.revoke_failed` once and retried every `cap` seconds, across restarts. A pending pair that
a newer lease holds again is parked, never removed under that lease, and reported removed once
the holder's own end really removes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime

from agent.domain.commands import Ack, AckStatus
from agent.domain.coverage import held_pairs
from agent.domain.errors import EnforcerError, StateError
from agent.domain.leases import EventKind, OutboxEvent, Pair, new_event
from agent.domain.removals import (
    Removal,
    RetryPolicy,
    failed_again,
    first_failure,
    is_due,
    needs_report,
)
from agent.enforcers.base import EnforcerSet
from agent.engine.shared import Shared, cut, sleep_or_wake
from agent.store.base import LeaseStore
from jitmesh.clock import Clock

log = logging.getLogger(__name__)


class Removals:
    def __init__(
        self,
        *,
        store: LeaseStore,
        enforcers: EnforcerSet,
        clock: Clock,
        shared: Shared,
        policy: RetryPolicy,
        rand: Callable[[], float],
        now: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._enforcers = enforcers
        self._clock = clock
        self._shared = shared
        self.policy = policy
        self._rand = rand
        self._now = now
        # A copy of the store's pending removals, retried in the background until they succeed.
        self.pending: dict[Pair, Removal] = {}
        # Background removals running now (outside the lock), by pair.
        self.removing: dict[Pair, asyncio.Task[None]] = {}

    async def load(self, wall: datetime) -> None:
        """Removals still owed from before the restart: retried at once (in the background, by
        `run`), then on their schedule."""
        self.pending = {
            removal.pair: replace(removal, next_at=wall) for removal in await self._store.removals()
        }

    def owed(self) -> set[Pair]:
        """Pairs whose removal is owed or running: the retry loop's, not drift."""
        return set(self.pending) | set(self.removing)

    def still_owed(self, ack: Ack) -> Ack | None:
        """A FAILED ack if the grant's removal is still pending."""
        for removal in self.pending.values():
            if ack.grant_id and ack.grant_id in removal.grant_ids:
                return Ack(
                    ack.seq,
                    AckStatus.FAILED,
                    cut(f"removal pending: {removal.error}"),
                    ack.grant_id,
                )
        return None

    async def pend(self, pair: Pair, grant_ids: Iterable[str], error: str) -> None:
        """A removal of `pair` failed after its leases ended: persist it for the retry loop
        (merged into one already pending for the pair)."""
        now = self._now()
        removal = first_failure(
            pair,
            tuple(grant_ids),
            now=now,
            error=cut(error),
            policy=self.policy,
            rand=self._rand(),
            existing=self.pending.get(pair),
        )
        await self._keep(removal, now)
        log.warning(
            "removal pending",
            extra={"subject": pair[0], "action": pair[1], "attempts": removal.attempts},
        )

    async def _keep(self, removal: Removal, now: datetime) -> None:
        events: list[OutboxEvent] = []
        if needs_report(removal, self.policy):
            # The attempts ran out: REVOKE_FAILED, reported once (and the retries go on).
            removal = replace(removal, reported=True)
            events = [
                new_event(
                    EventKind.GRANT_REVOKE_FAILED,
                    at=now,
                    pair=removal.pair,
                    grant_id=grant_id,
                    details={"attempts": str(removal.attempts), "reason": removal.error},
                )
                for grant_id in removal.grant_ids
            ]
            log.error(
                "revoke failed after retries",
                extra={"subject": removal.pair[0], "action": removal.pair[1]},
            )
        self.pending[removal.pair] = removal
        try:
            await self._store.save_removal(removal, events)
        except StateError as exc:
            # Kept in memory (retried all the same); the store journals what it can.
            log.error("cannot persist a pending removal", extra={"error": str(exc)})
        if events:
            self._shared.outbox_changed.set()
        self._shared.removals_changed.set()

    async def removed(self, pair: Pair, now: datetime) -> None:
        """`pair` was really removed: a removal pending for it is done; its grants are reported
        removed (the coordinator moves REVOKE_FAILED to REVOKED on these events)."""
        removal = self.pending.pop(pair, None)
        if removal is None:
            return
        events = [
            new_event(
                EventKind.GRANT_REMOVED,
                at=now,
                pair=pair,
                grant_id=grant_id,
                details={"retried": "true", "attempts": str(removal.attempts + 1)},
            )
            for grant_id in removal.grant_ids
        ]
        try:
            await self._store.drop_removal(pair, events)
        except StateError as exc:
            # Not recorded: keep it owed, so the (idempotent) removal and its report are tried
            # again rather than lost.
            log.error("cannot record a removal", extra={"error": str(exc)})
            self.pending[pair] = replace(removal, next_at=now)
            self._shared.removals_changed.set()
            return
        if events:
            self._shared.outbox_changed.set()
        log.info(
            "pending removal done",
            extra={"subject": pair[0], "action": pair[1], "grant_ids": ",".join(removal.grant_ids)},
        )

    async def run(self, tasks: asyncio.TaskGroup) -> None:
        """Start each due pending removal as its own background task in `tasks` (the hook runs
        without the lock); sleep until the next one is due or the set changes."""
        shared = self._shared
        while True:
            shared.removals_changed.clear()
            delay = self.policy.cap
            async with shared.lock:
                now = self._now()
                held = held_pairs(await self._store.active_leases())
                for pair, removal in sorted(self.pending.items()):
                    if pair in self.removing or pair in held:
                        # Running already; or a newer lease holds the pair again (parked: its
                        # own end removes it, and completes this one).
                        continue
                    if is_due(removal, now, policy=self.policy):
                        self.removing[pair] = tasks.create_task(self._retry(pair))
                    else:
                        delay = min(delay, (removal.next_at - now).total_seconds())
            await sleep_or_wake(
                self._clock, self._clock.monotonic() + max(0.0, delay), shared.removals_changed
            )

    async def _retry(self, pair: Pair) -> None:
        try:
            error = ""
            try:
                await self._enforcers.remove(pair)
            except EnforcerError as exc:
                error = cut(str(exc))
            async with self._shared.lock:
                now = self._now()
                removal = self.pending.get(pair)
                if removal is not None and not error:
                    await self.removed(pair, now)
                elif removal is not None:
                    again = failed_again(
                        removal, now=now, error=error, policy=self.policy, rand=self._rand()
                    )
                    await self._keep(again, now)
                del self.removing[pair]
        finally:
            self.removing.pop(pair, None)
            self._shared.removals_changed.set()
            self._shared.leases_changed.set()
