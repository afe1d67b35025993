"""A lease store held in memory, behind the same `LeaseStore` interface as the SQLite one.

For many agents in one process (the fault suite's reconnect storm, benchmarks): nothing survives
the process, so it stands in for a real agent only where restarts are not what is tested. It
keeps the SQLite store's rules: compare-and-set on `state = active`, an outbox written once per
event id, the epoch only ever raised, the last wall time never lowered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime

from agent.domain.breakglass import KeptLock, LockChange, Use
from agent.domain.errors import StateError
from agent.domain.leases import Lease, LeaseState, OutboxEvent, Pair
from agent.domain.removals import Removal

from .base import Meta


class MemoryLeaseStore:
    def __init__(self) -> None:
        self._meta = Meta(
            agent="",
            last_applied_seq=0,
            epoch=0,
            boot_id="",
            last_wall_at=None,
            last_contact_at=None,
        )
        self._leases: dict[str, Lease] = {}
        # Insertion order is delivery order (dicts keep it).
        self._outbox: dict[str, OutboxEvent] = {}
        self._counter = 0
        self._removals: dict[Pair, Removal] = {}
        self._locks: dict[str, KeptLock] = {}
        # code id -> (use, adopted)
        self._breakglass: dict[str, tuple[Use, bool]] = {}

    async def meta(self) -> Meta:
        return self._meta

    async def claim(self, agent: str, boot_id: str) -> None:
        if self._meta.agent and self._meta.agent != agent:
            raise StateError("the state directory belongs to an agent with another name")
        self._meta = replace(self._meta, agent=agent, boot_id=boot_id)

    async def lease(self, grant_id: str) -> Lease | None:
        return self._leases.get(grant_id)

    async def leases(self, grant_ids: Iterable[str]) -> dict[str, Lease]:
        return {g: self._leases[g] for g in set(grant_ids) if g in self._leases}

    async def active_leases(self) -> list[Lease]:
        active = [lease for lease in self._leases.values() if lease.state is LeaseState.ACTIVE]
        return sorted(active, key=lambda lease: lease.not_after)

    async def active_leases_of(self, pairs: Iterable[Pair]) -> list[Lease]:
        wanted = set(pairs)
        return [lease for lease in await self.active_leases() if lease.pair in wanted]

    async def record_command(
        self,
        *,
        seq: int,
        epoch: int,
        writes: Sequence[Lease],
        snapshot: bool = False,
        locks: LockChange | None = None,
    ) -> None:
        if locks is not None:
            if locks.replace:
                self._locks.clear()
            for lock_id in locks.drop:
                self._locks.pop(lock_id, None)
            self._locks.update((lock.lock_id, lock) for lock in locks.put)
        for lease in writes:
            self._leases[lease.grant_id] = lease
        self._meta = replace(
            self._meta,
            last_applied_seq=seq,
            epoch=max(self._meta.epoch, epoch),
            snapshot_seq=seq if snapshot else self._meta.snapshot_seq,
        )

    async def mark_applied(
        self, grant_id: str, at: datetime, event: OutboxEvent | None = None
    ) -> bool:
        lease = self._leases.get(grant_id)
        if lease is None or lease.state is not LeaseState.ACTIVE:
            return False
        self._leases[grant_id] = replace(lease, applied_at=at)
        if event is not None:
            self._keep(event)
        return True

    async def mark_failed(
        self, grant_id: str, at: datetime, reason: str, event: OutboxEvent | None = None
    ) -> bool:
        lease = self._leases.get(grant_id)
        if lease is None or lease.state is not LeaseState.ACTIVE:
            return False
        self._leases[grant_id] = lease.ended(at=at, reason=reason, state=LeaseState.FAILED)
        if event is not None:
            self._keep(event)
        return True

    async def end_lease(self, lease: Lease, event: OutboxEvent | None = None) -> bool:
        if lease.state is LeaseState.ACTIVE or lease.removed_at is None:
            raise ValueError("end_lease needs an ended lease")
        current = self._leases.get(lease.grant_id)
        if current is None or current.state is not LeaseState.ACTIVE:
            return False
        self._leases[lease.grant_id] = replace(
            current,
            state=lease.state,
            removed_at=lease.removed_at,
            remove_reason=lease.remove_reason,
        )
        if event is not None:
            self._keep(event)
        return True

    async def locks(self) -> list[KeptLock]:
        return [self._locks[k] for k in sorted(self._locks)]

    async def record_breakglass(self, lease: Lease, use: Use, event: OutboxEvent) -> bool:
        if use.code_id in self._breakglass:
            return False
        self._breakglass[use.code_id] = (use, False)
        self._leases[lease.grant_id] = lease
        self._keep(event)
        return True

    async def breakglass_used(self, code_id: str) -> bool:
        return code_id in self._breakglass

    async def breakglass_unadopted(self) -> list[Use]:
        return [use for use, adopted in self._breakglass.values() if not adopted]

    async def breakglass_adopted(self, code_ids: Iterable[str]) -> None:
        for code_id in code_ids:
            if code_id in self._breakglass:
                self._breakglass[code_id] = (self._breakglass[code_id][0], True)

    async def ended_leases(self, *, after: str = "", limit: int = 500) -> list[Lease]:
        ids = sorted(
            gid
            for gid, lease in self._leases.items()
            if lease.state is not LeaseState.ACTIVE and gid > after
        )
        return [self._leases[gid] for gid in ids[:limit]]

    async def delete_ended(self, grant_ids: Iterable[str]) -> int:
        gone = 0
        for gid in set(grant_ids):
            lease = self._leases.get(gid)
            if lease is not None and lease.state is not LeaseState.ACTIVE:
                del self._leases[gid]
                gone += 1
        return gone

    async def removals(self) -> list[Removal]:
        return [self._removals[pair] for pair in sorted(self._removals)]

    async def save_removal(self, removal: Removal, events: Sequence[OutboxEvent] = ()) -> None:
        self._removals[removal.pair] = removal
        for event in events:
            self._keep(event)

    async def drop_removal(self, pair: Pair, events: Sequence[OutboxEvent] = ()) -> None:
        self._removals.pop(pair, None)
        for event in events:
            self._keep(event)

    def _keep(self, event: OutboxEvent) -> None:
        if event.event_id not in self._outbox:
            self._counter += 1
            self._outbox[event.event_id] = replace(event, counter=self._counter)

    async def add_event(self, event: OutboxEvent) -> None:
        self._keep(event)

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        return list(self._outbox.values())[:limit]

    async def delete_events(self, event_ids: Iterable[str]) -> int:
        return sum(self._outbox.pop(e, None) is not None for e in set(event_ids))

    async def note_epoch(self, epoch: int) -> None:
        self._meta = replace(self._meta, epoch=max(self._meta.epoch, epoch))

    async def note_wall(self, at: datetime) -> None:
        last = self._meta.last_wall_at
        self._meta = replace(self._meta, last_wall_at=at if last is None else max(last, at))

    async def note_contact(self, at: datetime) -> None:
        self._meta = replace(self._meta, last_contact_at=at)

    def close(self) -> None:
        pass
