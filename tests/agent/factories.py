"""Small builders shared by the agent tests."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from agent.domain.commands import (
    CommandSpec,
    GrantSpec,
    LockSpec,
    RevokeSpec,
    SnapshotSpec,
    UnlockSpec,
)
from agent.domain.coverage import Cover
from agent.domain.leases import HOLD, Lease, LeaseState
from jitmesh.types import OfflineMode, OfflinePolicy

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "web-1"


def gid() -> str:
    return f"grt-{uuid.uuid4().hex}"


def lease(
    subject: str = "alice",
    action: str = "deploy",
    *,
    grant_id: str | None = None,
    start: timedelta = timedelta(0),
    length: timedelta = timedelta(minutes=10),
    applied: bool = True,
    state: LeaseState = LeaseState.ACTIVE,
    offline: OfflinePolicy = HOLD,
    seq: int = 1,
) -> Lease:
    return Lease(
        grant_id=grant_id or gid(),
        subject=subject,
        action=action,
        not_before=T0 + start,
        not_after=T0 + start + length,
        state=state,
        seq=seq,
        offline=offline,
        applied_at=T0 + start if applied else None,
    )


def grant(
    subject: str = "alice",
    action: str = "deploy",
    *,
    grant_id: str | None = None,
    start: timedelta = timedelta(0),
    length: timedelta = timedelta(minutes=10),
    offline: OfflinePolicy = HOLD,
) -> GrantSpec:
    return GrantSpec(
        grant_id=grant_id or gid(),
        subject=subject,
        action=action,
        not_before=T0 + start,
        not_after=T0 + start + length,
        offline=offline,
    )


def revoke_after(grace: timedelta) -> OfflinePolicy:
    return OfflinePolicy(OfflineMode.REVOKE_AFTER, grace)


def command(
    seq: int,
    kind: GrantSpec | RevokeSpec | SnapshotSpec | LockSpec | UnlockSpec,
    *,
    agent: str = AGENT,
    epoch: int = 1,
) -> CommandSpec:
    return CommandSpec(seq=seq, agent=agent, body_seq=seq, epoch=epoch, kind=kind)


def ended(item: Lease, at: datetime) -> Lease:
    return replace(item, state=LeaseState.REMOVED, removed_at=at, remove_reason="revoked")


def cover(
    subject: str = "alice",
    action: str = "deploy",
    *,
    grant_id: str = "grt-00000000000000000000000000000001",
    start: timedelta = timedelta(0),
    length: timedelta = timedelta(minutes=10),
) -> Cover:
    """The window an enforcer is given for a pair."""
    return Cover(subject, action, grant_id, T0 + start, T0 + start + length)
