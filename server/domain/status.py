"""The mesh at a glance (`jitctl status`, the Mesh.Status RPC): counts from the store, the
agents connected, the coordinator replicas running, the audit head. For those who read
everything (admins and the auditor groups, domain/reads.py): it describes everyone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from jitmesh.clock import Clock
from jitmesh.types import Replica

from .errors import PermissionDenied
from .fleet import REPLICA_ALIVE
from .models import Principal, ReplicaInfo, StatusCounts
from .ports import Store
from .reads import Readers

# Ended grants are counted over this window (the live ones always).
ENDED_WINDOW = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MeshStatus:
    at: datetime
    epoch: int
    # Over every replica running (this one's own count is its live streams).
    agents_connected: int
    audit_head_seq: int
    counts: StatusCounts
    # The replicas running, this one first.
    replicas: tuple[Replica, ...] = ()


def running_replicas(
    known: list[ReplicaInfo],
    this: str,
    this_connected: int,
    counts: StatusCounts,
    now: datetime,
    *,
    shared: bool,
) -> tuple[Replica, ...]:
    """The replicas running at `now`: on a shared store (PostgreSQL) each that reported itself
    within REPLICA_ALIVE (a killed one stops reporting), on SQLite only this coordinator (an
    id the data directory had before is not another replica). This one comes first, with its
    own count of streams; the others with the store's."""
    found = []
    for info in known:
        if info.id == this:
            connected = this_connected
        elif shared and now - info.last_seen_at <= REPLICA_ALIVE:
            connected = counts.connected_by_replica.get(info.id, 0)
        else:
            continue
        found.append(
            Replica(
                info.id, info.address, info.version, info.started_at, info.last_seen_at, connected
            )
        )
    found.sort(key=lambda r: (r.id != this, r.id))
    return tuple(found)


class StatusService:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        epoch: int,
        agents_connected: Callable[[], int],
        audit_head: Callable[[], Awaitable[tuple[int, str]]],
        readers: Readers | None = None,
        *,
        replica: str = "",
        shared_store: bool = False,
    ) -> None:
        self._readers = readers or Readers()
        self._store = store
        self._clock = clock
        self._epoch = epoch
        self._connected = agents_connected
        self._head = audit_head
        self._replica = replica
        self._shared = shared_store

    async def status(self, principal: Principal) -> MeshStatus:
        if not self._readers.reads_everything(principal):
            raise PermissionDenied("only admins and auditors may see the mesh status")
        now = self._clock.now()
        counts = await self._store.status_counts(now, now - ENDED_WINDOW)
        head_seq, _ = await self._head()
        connected = self._connected()
        replicas = running_replicas(
            await self._store.list_replicas(),
            self._replica,
            connected,
            counts,
            now,
            shared=self._shared,
        )
        total = connected + sum(r.agents_connected for r in replicas if r.id != self._replica)
        return MeshStatus(now, self._epoch, total, head_seq, counts, replicas)
