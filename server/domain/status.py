"""The mesh at a glance (`jitctl status`, the Mesh.Status RPC): counts from the store, the
agents connected to this coordinator, the audit head. Admins only (it describes everyone)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from jitmesh.clock import Clock

from .errors import PermissionDenied
from .models import Principal, StatusCounts
from .ports import Store

# Ended grants are counted over this window (the live ones always).
ENDED_WINDOW = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MeshStatus:
    at: datetime
    epoch: int
    agents_connected: int
    audit_head_seq: int
    counts: StatusCounts


class StatusService:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        epoch: int,
        agents_connected: Callable[[], int],
        audit_head: Callable[[], Awaitable[tuple[int, str]]],
    ) -> None:
        self._store = store
        self._clock = clock
        self._epoch = epoch
        self._connected = agents_connected
        self._head = audit_head

    async def status(self, principal: Principal) -> MeshStatus:
        if not principal.is_admin:
            raise PermissionDenied("only admins may see the mesh status")
        now = self._clock.now()
        counts = await self._store.status_counts(now, now - ENDED_WINDOW)
        head_seq, _ = await self._head()
        return MeshStatus(now, self._epoch, self._connected(), head_seq, counts)
