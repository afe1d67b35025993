"""Notifiable events: which audit events reach people, and what a notice carries.

A notice is written to the outbox in the same transaction as the audit event it comes from (the
store does it where it writes audit events, so no path can write one without the other); the
sender (`server/notify/`) routes it to receivers afterwards. Pure: no I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from jitmesh.types import AuditEvent

from .models import AuditKind


class NoticeKind(enum.StrEnum):
    """The audit kinds that become notices. The value is the audit kind itself, so routes,
    webhook bodies and the audit log use one name for one event."""

    REQUEST_CREATED = AuditKind.REQUEST_CREATED.value
    STAGE_APPROVED = AuditKind.REQUEST_STAGE_APPROVED.value
    REQUEST_APPROVED = AuditKind.REQUEST_APPROVED.value
    REQUEST_DENIED = AuditKind.REQUEST_DENIED.value
    REQUEST_EXPIRED = AuditKind.REQUEST_EXPIRED.value
    GRANT_APPLIED = AuditKind.GRANT_APPLIED.value
    GRANT_EXPIRING = AuditKind.GRANT_EXPIRING.value
    GRANT_REVOKED = AuditKind.GRANT_REVOKED.value
    GRANT_REVOKE_FAILED = AuditKind.GRANT_REVOKE_FAILED.value
    BREAKGLASS_USED = AuditKind.BREAKGLASS_USED.value
    LOCK_CREATED = AuditKind.LOCK_CREATED.value


NOTIFIABLE = frozenset(k.value for k in NoticeKind)

# Notices an approver can act on (they carry Approve and Deny where the receiver can).
FOR_APPROVERS = frozenset({NoticeKind.REQUEST_CREATED, NoticeKind.STAGE_APPROVED})

# Outcomes the requester is told about, whatever the routes say ("requesters get their own").
FOR_REQUESTER = frozenset(
    {
        NoticeKind.REQUEST_APPROVED,
        NoticeKind.REQUEST_DENIED,
        NoticeKind.REQUEST_EXPIRED,
        NoticeKind.GRANT_APPLIED,
        NoticeKind.GRANT_EXPIRING,
        NoticeKind.GRANT_REVOKED,
    }
)

TITLES: dict[NoticeKind, str] = {
    NoticeKind.REQUEST_CREATED: "Access requested",
    NoticeKind.STAGE_APPROVED: "Approval stage passed",
    NoticeKind.REQUEST_APPROVED: "Request approved",
    NoticeKind.REQUEST_DENIED: "Request denied",
    NoticeKind.REQUEST_EXPIRED: "Request expired without a decision",
    NoticeKind.GRANT_APPLIED: "Access applied on the host",
    NoticeKind.GRANT_EXPIRING: "Access expires soon",
    NoticeKind.GRANT_REVOKED: "Access revoked",
    NoticeKind.GRANT_REVOKE_FAILED: "Revoke failed on the host",
    NoticeKind.BREAKGLASS_USED: "Break-glass used",
    NoticeKind.LOCK_CREATED: "Lock created",
}


@dataclass(frozen=True, slots=True)
class Notice:
    """One notifiable event, as stored in the outbox. `id` is the audit event's id: receivers
    can use it to drop a repeat (it is sent as the delivery id)."""

    id: str
    kind: NoticeKind
    at: datetime
    actor: str
    subject: str = ""
    agent: str = ""
    request_id: str = ""
    grant_id: str = ""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return TITLES[self.kind]

    @property
    def action(self) -> str:
        return self.details.get("action", "")

    @property
    def for_approvers(self) -> bool:
        return self.kind in FOR_APPROVERS


def notice_for(event: AuditEvent) -> Notice | None:
    """The notice an audit event makes, or None when people are not told about it."""
    if event.kind not in NOTIFIABLE:
        return None
    return Notice(
        id=event.id,
        kind=NoticeKind(event.kind),
        at=event.at,
        actor=event.actor,
        subject=event.subject,
        agent=event.agent,
        request_id=event.request_id,
        grant_id=event.grant_id,
        details=dict(event.details),
    )
