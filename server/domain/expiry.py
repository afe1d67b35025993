"""Expiry on the coordinator: grants past not_after and pending requests past their TTL.

The agent removes access on its own at not_after; the coordinator records the expiry so its view
agrees. Work is batched (one transaction per batch), and the loop sleeps until the next deadline
or until a new one is added.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from jitmesh.clock import Clock
from jitmesh.types import AuditEvent, GrantState, RequestState

from .errors import Conflict, Unavailable
from .hub import Hub
from .models import AuditEntry, AuditKind, GrantChange, Moved, gc_paused, new_ids
from .ports import Store, Tx

log = logging.getLogger(__name__)
BATCH = 5000
# Never sleep longer than this: a missed wake-up costs at most this much lateness.
MAX_NAP = timedelta(seconds=30)
# After a deferred sweep: how soon the next turn tries again.
CONFLICT_NAP = timedelta(milliseconds=50)
UNAVAILABLE_NAP = timedelta(seconds=1)


class Expirer:
    def __init__(self, store: Store, hub: Hub, clock: Clock) -> None:
        self._store = store
        self._hub = hub
        self._clock = clock
        self._wake = asyncio.Event()
        # Issues the grants of scheduled requests whose start has come (AccessService's).
        self.start_due: Callable[[datetime], Awaitable[int]] | None = None

    def deadlines_changed(self) -> None:
        self._wake.set()

    async def sweep(self, now: datetime) -> tuple[int, int]:
        """Expire everything due at `now`. Returns (grants, requests) expired."""
        grants = requests = 0
        while True:

            async def batch(tx: Tx) -> tuple[list[Moved], list[Moved], list[AuditEvent]]:
                # Set-based: the due grants move in one UPDATE (per state they leave), then one
                # multi-row audit insert with one event per grant; no per-row round trips. On
                # PostgreSQL, rows another replica's sweep holds are skipped (it moves them),
                # and a batch that meets a deadlock is run again by the store.
                moved = await tx.move_due_grants(
                    now,
                    BATCH,
                    state=GrantState.EXPIRED,
                    change=GrantChange(ended_at=now, end_reason="expired"),
                )
                ended = await tx.move_due_requests(
                    now,
                    BATCH,
                    state=RequestState.EXPIRED,
                    by="coordinator",
                    reason="not reviewed in time",
                )
                written = await tx.audit_many(
                    _expired_grants(moved, now)
                    # Subject and agent too, so the event shows up in filtered audit lists.
                    + [
                        AuditEntry(
                            AuditKind.REQUEST_EXPIRED,
                            "coordinator",
                            now,
                            subject=request.subject,
                            agent=request.agent,
                            request_id=request.id,
                            details={"action": request.action},
                        )
                        for request in ended
                    ],
                    # Every id was made just now: no look-up of stored ids.
                    fresh=True,
                )
                return moved, ended, written

            moved, ended, written = await self._store.write(batch)
            grants += len(moved)
            requests += len(ended)
            self._hub.requests_changed(
                [grant.request_id for grant in moved] + [request.id for request in ended]
            )
            await self._hub.audit_written(written)
            if len(moved) < BATCH and len(ended) < BATCH:
                return grants, requests

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                nap = await self._turn()
            except (Conflict, Unavailable) as exc:
                # The store gave up on a batch (contention between replicas: again at once) or
                # did not answer (a database restarting: again in a second). The rows are still
                # due, so a later turn takes them; the coordinator keeps serving meanwhile.
                log.warning("expiry sweep deferred: %s", exc)
                nap = CONFLICT_NAP if isinstance(exc, Conflict) else UNAVAILABLE_NAP
            await self._nap(max(nap.total_seconds(), 0.0))

    async def _turn(self) -> timedelta:
        """Sweep if something is due; how long until the next deadline (at most MAX_NAP)."""
        now = self._clock.now()
        deadline = await self._store.next_deadline()
        # Woken by every new deadline (each request created): sweep only when something is
        # due, not a write transaction per request.
        if deadline is not None and deadline <= now:
            await self.sweep(now)
            if self.start_due is not None:
                await self.start_due(now)
            deadline = await self._store.next_deadline()
        return MAX_NAP if deadline is None else min(MAX_NAP, deadline - self._clock.now())

    async def _nap(self, seconds: float) -> None:
        if seconds <= 0:
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()


def _expired_grants(moved: Sequence[Moved], now: datetime) -> list[AuditEntry]:
    """One `grant.expired` event per grant, built in bulk (a sweep makes up to 100,000 at
    once): ids drawn together, and one details object per (action, state left) shared by the
    entries that have it (entries are values; the store copies details once per object)."""
    shapes: dict[tuple[str, str], dict[str, str]] = {}
    entries: list[AuditEntry] = []
    with gc_paused():
        for grant, event_id in zip(moved, new_ids("evt", len(moved)), strict=True):
            details = shapes.get((grant.action, grant.was))
            if details is None:
                details = shapes[grant.action, grant.was] = {
                    "action": grant.action,
                    "was": grant.was,
                }
            entries.append(
                AuditEntry(
                    AuditKind.GRANT_EXPIRED, "coordinator", now, grant.subject, grant.agent,
                    grant.request_id, grant.id, details, event_id,
                )
            )  # fmt: skip
    return entries
