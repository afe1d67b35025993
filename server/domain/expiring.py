"""Warnings before access ends: every ACTIVE grant gets one `grant.expiring` audit event (and so
a notice, with a link to extend it) when its end comes within the warning time. The event's id
is made from the grant and its end, so a restart or a second replica never warns twice for the
same end, and an extended grant is warned again before its new end."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from jitmesh.clock import Clock, rfc3339, to_ms
from jitmesh.durations import format_duration
from jitmesh.types import Grant

from .hub import Hub
from .models import AuditEntry, AuditKind
from .ports import Store

BATCH = 500
MAX_NAP = timedelta(seconds=30)


def warning_id(grant: Grant) -> str:
    return f"evt-expiring-{grant.id}-{to_ms(grant.not_after)}"


def _warning(g: Grant, now: datetime) -> AuditEntry:
    return AuditEntry(
        AuditKind.GRANT_EXPIRING,
        "coordinator",
        now,
        subject=g.subject,
        agent=g.agent,
        request_id=g.request_id,
        grant_id=g.id,
        details={
            "action": g.action,
            "expires_at": rfc3339(g.not_after),
            "left": format_duration(
                timedelta(seconds=max(1, round((g.not_after - now).total_seconds())))
            ),
        },
        id=warning_id(g),
    )


class ExpiryWarnings:
    def __init__(self, store: Store, hub: Hub, clock: Clock, warning: timedelta) -> None:
        self._store = store
        self._hub = hub
        self._clock = clock
        self._warning = warning
        self._wake = asyncio.Event()
        # Warnings already written by this process (their grants' ends), so each pass writes
        # only new ones; after a restart the stored ids do the same.
        self._warned: dict[str, datetime] = {}

    def wake(self) -> None:
        self._wake.set()

    async def warn_due(self, now: datetime) -> int:
        """Write the warnings due at `now`; how many were new."""
        written = 0
        after = now
        while True:
            found = await self._store.expiring_grants(after, now + self._warning, BATCH)
            due = [g for g in found if warning_id(g) not in self._warned]
            if due:
                async with self._store.transaction() as tx:
                    events = await tx.audit_many([_warning(g, now) for g in due])
                written += len(events)
                self._warned.update((warning_id(g), g.not_after) for g in due)
                await self._hub.audit_written(tx.new_audit)
            if len(found) < BATCH:
                self._warned = {k: end for k, end in self._warned.items() if end > now}
                return written
            after = found[-1].not_after

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock.now()
            await self.warn_due(now)
            # Sleep until the next end comes within the warning (or something changed).
            upcoming = await self._store.expiring_grants(
                now + self._warning, now + self._warning + MAX_NAP, 1
            )
            nap = MAX_NAP
            if upcoming:
                nap = min(nap, upcoming[0].not_after - self._warning - now)
            sleeper = asyncio.ensure_future(self._clock.sleep(max(nap.total_seconds(), 0.001)))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
