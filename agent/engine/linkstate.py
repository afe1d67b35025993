"""Link state: what the engine knows about its coordinator (connected or since when not, the
command log's resume point and epoch) and the outbox the link sends from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from agent.domain.breakglass import Use
from agent.domain.leases import OutboxEvent
from agent.engine.shared import Shared, best_effort
from agent.store.base import LeaseStore, Meta


@dataclass(frozen=True, slots=True)
class HelloState:
    last_applied_seq: int
    epoch: int
    active_grant_ids: tuple[str, ...]
    # Ended, their removal from the host still retried (wire 0.2, Hello.removing_grant_ids).
    removing_grant_ids: tuple[str, ...] = ()
    # Break-glass uses the coordinator has not adopted yet (wire 0.2, Hello.breakglass).
    breakglass: tuple[Use, ...] = ()


class LinkState:
    def __init__(self, *, store: LeaseStore, shared: Shared, now: Callable[[], datetime]) -> None:
        self._store = store
        self._shared = shared
        self._now = now
        self.connected = False
        # Since when the coordinator is out of reach (None while connected): revoke_after
        # leases count from here.
        self.offline_since: datetime | None = None
        self.last_applied_seq = 0
        self.snapshot_seq = 0
        self.epoch = 0

    def load(self, meta: Meta) -> None:
        self.last_applied_seq = meta.last_applied_seq
        self.snapshot_seq = meta.snapshot_seq
        self.epoch = meta.epoch
        # Until the link reaches the coordinator, it has been out of reach since the last contact.
        self.offline_since = meta.last_contact_at

    def applied(self, seq: int, epoch: int, *, snapshot: bool = False) -> None:
        """A command was recorded: the log resumes after it."""
        self.last_applied_seq = seq
        self.epoch = max(self.epoch, epoch)
        if snapshot:
            self.snapshot_seq = seq

    async def hello_state(self) -> HelloState:
        active = await self._store.active_leases()
        removing = sorted({gid for r in await self._store.removals() for gid in r.grant_ids})
        return HelloState(
            self.last_applied_seq,
            self.epoch,
            tuple(lease.grant_id for lease in active),
            tuple(removing),
            tuple(await self._store.breakglass_unadopted()),
        )

    async def note_epoch(self, epoch: int) -> None:
        if epoch > self.epoch:
            self.epoch = epoch
            with best_effort("the epoch"):
                await self._store.note_epoch(epoch)

    async def reached(self) -> None:
        self.connected = True
        self.offline_since = None
        with best_effort("the contact time"):
            await self._store.note_contact(self._now())
        self._shared.leases_changed.set()

    async def alive(self) -> None:
        if self.connected:
            with best_effort("the contact time"):
                await self._store.note_contact(self._now())

    async def lost(self) -> None:
        if not self.connected:
            return
        now = self._now()
        self.connected = False
        self.offline_since = now
        with best_effort("the contact time"):
            await self._store.note_contact(now)
        # revoke_after leases now have an earlier deadline.
        self._shared.leases_changed.set()

    async def checkpoint(self) -> None:
        """Persist the time reached (and the contact, if connected), e.g. before stopping."""
        now = self._now()
        with best_effort("the time reached"):
            await self._store.note_wall(now)
            if self.connected:
                await self._store.note_contact(now)

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        return await self._store.pending_events(limit)

    async def events_delivered(self, event_ids: Iterable[str]) -> None:
        # Events not deleted are sent again; the coordinator stores each id once.
        with best_effort("delivered events"):
            if await self._store.delete_events(event_ids):
                self._shared.outbox_changed.set()
