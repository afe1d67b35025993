"""When leases start and end on their own, decided from the table and the current time.

A lease ends at its not_after. Under the `revoke_after` offline policy it ends earlier, `grace`
after the agent lost the coordinator, while the coordinator stays out of reach. A lease whose
not_before lies ahead starts when it comes. Nothing here waits: the expiry loop sleeps until
`next_wakeup` and asks `due` again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from jitmesh.types import OfflineMode

from .leases import Lease, LeaseState


class EndCause(enum.StrEnum):
    EXPIRED = "expired"
    OFFLINE = "offline"


def deadline(lease: Lease, offline_since: datetime | None) -> tuple[datetime, EndCause]:
    """When `lease` ends on its own, and why. `offline_since`: None while connected."""
    if lease.offline.mode is OfflineMode.REVOKE_AFTER and offline_since is not None:
        cutoff = offline_since + lease.offline.grace
        if cutoff < lease.not_after:
            return cutoff, EndCause.OFFLINE
    return lease.not_after, EndCause.EXPIRED


@dataclass(frozen=True, slots=True)
class Due:
    starts: tuple[Lease, ...]
    ends: tuple[tuple[Lease, EndCause], ...]


def due(leases: Iterable[Lease], now: datetime, offline_since: datetime | None) -> Due:
    starts: list[Lease] = []
    ends: list[tuple[Lease, EndCause]] = []
    for lease in leases:
        if lease.state is not LeaseState.ACTIVE:
            continue
        end_at, cause = deadline(lease, offline_since)
        if now >= end_at:
            ends.append((lease, cause))
        elif lease.applied_at is None and lease.not_before <= now:
            starts.append(lease)
    return Due(tuple(starts), tuple(ends))


def next_wakeup(leases: Iterable[Lease], offline_since: datetime | None) -> datetime | None:
    """The earliest instant at which `due` can change, or None when nothing is active."""
    moments: list[datetime] = []
    for lease in leases:
        if lease.state is not LeaseState.ACTIVE:
            continue
        end_at, _ = deadline(lease, offline_since)
        moments.append(end_at)
        if lease.applied_at is None and lease.not_before < end_at:
            moments.append(lease.not_before)
    return min(moments, default=None)
