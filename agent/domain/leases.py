"""Leases (the agent's copy of a grant) and the events the agent reports about them."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from jitmesh.clock import EPOCH
from jitmesh.types import OfflinePolicy

Pair = tuple[str, str]
"""(subject, action): what an enforcer applies. Several leases can share one pair."""

HOLD = OfflinePolicy()


class LeaseState(enum.StrEnum):
    ACTIVE = "active"
    REMOVED = "removed"
    # A revoke arrived for a grant the agent never saw: the id is refused if the grant comes late.
    TOMBSTONE = "tombstone"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Lease:
    grant_id: str
    subject: str
    action: str
    not_before: datetime
    not_after: datetime
    state: LeaseState
    # Sequence number of the command that last wrote this lease.
    seq: int
    request_id: str = ""
    offline: OfflinePolicy = HOLD
    # Set once the lease's pair is in force on the host on its behalf (applied by the enforcers,
    # or already applied for an overlapping lease). None while a scheduled start is pending.
    applied_at: datetime | None = None
    removed_at: datetime | None = None
    remove_reason: str = ""

    @property
    def pair(self) -> Pair:
        return (self.subject, self.action)

    @property
    def holds(self) -> bool:
        """Its pair is applied on the host on its behalf and the lease has not ended yet."""
        return self.state is LeaseState.ACTIVE and self.applied_at is not None

    def allows(self, now: datetime) -> bool:
        """The local check rule: an active lease inside its time window."""
        return self.state is LeaseState.ACTIVE and self.not_before <= now < self.not_after

    def ended(self, *, at: datetime, reason: str, state: LeaseState = LeaseState.REMOVED) -> Lease:
        return replace(self, state=state, removed_at=at, remove_reason=reason)


def tombstone(grant_id: str, *, seq: int, at: datetime, reason: str) -> Lease:
    return Lease(
        grant_id=grant_id,
        subject="",
        action="",
        not_before=EPOCH,
        not_after=EPOCH,
        state=LeaseState.TOMBSTONE,
        seq=seq,
        removed_at=at,
        remove_reason=reason,
    )


class EventKind(enum.StrEnum):
    GRANT_EXPIRED = "grant.expired"
    # Scheduled start (not_before in the future when the grant arrived) that the agent applied.
    GRANT_APPLIED = "grant.applied"
    GRANT_APPLY_FAILED = "grant.apply_failed"
    # Access ended for another reason than expiry: offline grace ran out, or a removal that had
    # failed succeeded on retry.
    GRANT_REMOVED = "grant.removed"
    # Start-up reconcile found access on the host that no active lease covers, and removed it.
    DRIFT_REMOVED = "drift.removed"
    # The same, on an enforcer whose drift setting is `report`: audited, left in place.
    DRIFT_REPORTED = "drift.reported"
    # A grant refused because the agent's clock and the coordinator's disagree too much.
    GRANT_REFUSED = "grant.refused"
    # At start the wall clock was behind the last time the agent had recorded: every managed
    # grant was removed and new ones are refused until the coordinator's time is seen.
    CLOCK_UNTRUSTED = "clock.untrusted"
    CLOCK_TRUSTED = "clock.trusted"
    # A Welcome showed the agent's clock further from the coordinator's than the tolerance.
    CLOCK_SKEWED = "clock.skewed"
    # The lease table could not be read at start: moved aside, everything managed removed.
    STATE_MOVED_ASIDE = "state.moved_aside"
    # A revoke whose removal kept failing: access may still be in force (never reported revoked).
    GRANT_REVOKE_FAILED = "grant.revoke_failed"
    # A command run through `jitmesh-agent exec` started, and ended (exit code, duration, why).
    EXEC_STARTED = "exec.started"
    EXEC_EXITED = "exec.exited"
    # Processes ended because a grant ended: an exec run, or every process of the subject's user
    # (end_sessions = "user").
    SESSIONS_ENDED = "sessions.ended"
    # A break-glass code was used on the host: the lease the agent granted itself.
    BREAKGLASS_USED = "breakglass.used"


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    event_id: str
    kind: str
    observed_at: datetime
    grant_id: str = ""
    subject: str = ""
    action: str = ""
    details: Mapping[str, str] = field(default_factory=dict)
    # Assigned by the store when the event is written (1, 2, 3, ...): gaps show lost events.
    counter: int = 0


def new_event(
    kind: EventKind,
    *,
    at: datetime,
    lease: Lease | None = None,
    pair: Pair | None = None,
    grant_id: str = "",
    details: Mapping[str, str] | None = None,
) -> OutboxEvent:
    subject, action = lease.pair if lease is not None else (pair or ("", ""))
    return OutboxEvent(
        event_id=str(uuid.uuid4()),
        kind=kind.value,
        observed_at=at,
        grant_id=lease.grant_id if lease is not None else grant_id,
        subject=subject,
        action=action,
        details=dict(details or {}),
    )
