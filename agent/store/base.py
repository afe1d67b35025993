"""The lease store interface. The SQLite store implements it; an in-memory or a failing store
can stand in for it behind the same methods."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.domain.breakglass import KeptLock, LockChange, Use
from agent.domain.leases import Lease, OutboxEvent, Pair
from agent.domain.removals import Removal


@dataclass(frozen=True, slots=True)
class Meta:
    agent: str
    last_applied_seq: int
    # Highest coordinator epoch seen.
    epoch: int
    boot_id: str
    # Latest wall-clock instant the agent is known to have reached: time never runs back below it.
    last_wall_at: datetime | None
    # When the agent last knew it had the coordinator (the offline grace counts from here).
    last_contact_at: datetime | None
    # The seq of the last snapshot applied: commands below it were replaced by it.
    snapshot_seq: int = 0


class LeaseStore(Protocol):
    async def meta(self) -> Meta: ...

    async def claim(self, agent: str, boot_id: str) -> None:
        """Bind the store to `agent` (refusing a store of another agent) and note the boot id."""
        ...

    async def lease(self, grant_id: str) -> Lease | None: ...

    async def leases(self, grant_ids: Iterable[str]) -> dict[str, Lease]: ...

    async def active_leases(self) -> list[Lease]: ...

    async def active_leases_of(self, pairs: Iterable[Pair]) -> list[Lease]:
        """The active leases of `pairs` only, in `active_leases`'s order: what a command needs
        to count a pair's holders, read without every other pair's leases."""
        ...

    async def record_command(
        self,
        *,
        seq: int,
        epoch: int,
        writes: Sequence[Lease],
        snapshot: bool = False,
        locks: LockChange | None = None,
    ) -> None:
        """One transaction: the rows a command writes, the kept locks it changes, its sequence
        number as the last applied one (even when lower: a snapshot replaces everything), and
        the highest epoch seen."""
        ...

    async def locks(self) -> list[KeptLock]:
        """The locks kept from the coordinator (expired ones included: callers judge time)."""
        ...

    async def record_breakglass(self, lease: Lease, use: Use, event: OutboxEvent) -> bool:
        """One transaction: the code's use, its lease and its event. False (nothing written)
        when the code was used before: a code makes at most one lease."""
        ...

    async def breakglass_used(self, code_id: str) -> bool: ...

    async def breakglass_unadopted(self) -> list[Use]:
        """Uses the coordinator has not adopted yet (reported in every Hello until then)."""
        ...

    async def breakglass_adopted(self, code_ids: Iterable[str]) -> None: ...

    async def mark_applied(
        self, grant_id: str, at: datetime, event: OutboxEvent | None = None
    ) -> bool:
        """Active lease whose pair is now in force. False if it was no longer active."""
        ...

    async def mark_failed(
        self, grant_id: str, at: datetime, reason: str, event: OutboxEvent | None = None
    ) -> bool: ...

    async def end_lease(self, lease: Lease, event: OutboxEvent | None = None) -> bool:
        """Persist an active lease's end (`lease` is the ended row) and its event, atomically.
        The SQLite store keeps an end its table cannot take (a full disk) in its journal."""
        ...

    async def ended_leases(self, *, after: str = "", limit: int = 500) -> list[Lease]:
        """Rows that no longer grant anything (removed, failed, tombstone), by grant id, the
        first `limit` of those whose id sorts after `after` (pages of the whole set)."""
        ...

    async def delete_ended(self, grant_ids: Iterable[str]) -> int:
        """Delete these rows if they are ended (an active lease is never deleted); how many."""
        ...

    async def removals(self) -> list[Removal]:
        """Pending removals (failed removals of ended leases' pairs), by pair."""
        ...

    async def save_removal(self, removal: Removal, events: Sequence[OutboxEvent] = ()) -> None:
        """Insert or replace the pending removal of `removal.pair`, with `events`, atomically."""
        ...

    async def drop_removal(self, pair: Pair, events: Sequence[OutboxEvent] = ()) -> None:
        """The removal of `pair` succeeded: forget it and write `events`, atomically."""
        ...

    async def add_event(self, event: OutboxEvent) -> None: ...

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        """Oldest first."""
        ...

    async def delete_events(self, event_ids: Iterable[str]) -> int: ...

    async def note_epoch(self, epoch: int) -> None: ...

    async def note_wall(self, at: datetime) -> None: ...

    async def note_contact(self, at: datetime) -> None: ...

    def close(self) -> None: ...
