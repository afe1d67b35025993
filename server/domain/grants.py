"""The one place grants begin and end on the coordinator.

`write_grants` writes new grants with their audit (every path that approves, the batched
creation and a review alike, comes through it); `end_grants` ends live grants (revoke, release,
lock and agent removal alike): a compare-and-set move, a revoke command per grant in its agent's
log where one can still be delivered, and one audit event per grant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from jitmesh.clock import rfc3339
from jitmesh.durations import format_duration
from jitmesh.types import Grant, GrantState, Request

from .lifecycle import ENDABLE_GRANT_STATES
from .models import AuditEntry, AuditKind, Command, CommandKind, GrantChange
from .policy import Rule
from .ports import Tx


def approved_entries(by: str, request: Request, grant: Grant, now: datetime) -> list[AuditEntry]:
    """The audit of a new grant: the request approved, the grant created."""
    details = {"action": request.action, "duration": format_duration(request.duration)}
    if request.reason:
        details["reason"] = request.reason
    if request.plan is not None:
        details["policy_version"] = str(request.plan.policy_version)
        details["rule"] = request.plan.rule
    return [
        AuditEntry(
            AuditKind.REQUEST_APPROVED,
            by,
            now,
            subject=request.subject,
            agent=request.agent,
            request_id=request.id,
            grant_id=grant.id,
            details=details,
        ),
        AuditEntry(
            AuditKind.GRANT_CREATED,
            by,
            now,
            subject=grant.subject,
            agent=grant.agent,
            request_id=request.id,
            grant_id=grant.id,
            details={
                "action": grant.action,
                "not_after": rfc3339(grant.not_after),
                "offline": grant.offline.mode.value,
                "seq": str(grant.grant_seq),
            },
        ),
    ]


async def write_grants(
    tx: Tx,
    approved: Sequence[tuple[Request, Grant, str]],
    now: datetime,
    *,
    audit_first: Sequence[AuditEntry] = (),
) -> list[Command]:
    """Store new grants (each already numbered in its agent's command log) and audit them
    (`request.approved` by the approver named with each, `grant.created`), after the events in
    `audit_first`, which must be new entries too (ids made by `new_id` for them, never an
    agent's). Returns the grant commands to push once committed."""
    entries = list(audit_first)
    for request, grant, by in approved:
        entries.extend(approved_entries(by, request, grant, now))
    await tx.insert_grants([grant for _, grant, _ in approved])
    # Every id was made just now: no look-up of stored ids (a trip while holding the writer).
    await tx.audit_many(entries, fresh=True)
    return [
        Command(grant.agent, grant.grant_seq, CommandKind.GRANT, grant) for _, grant, _ in approved
    ]


async def end_grants(
    tx: Tx,
    grants: Sequence[Grant],
    now: datetime,
    *,
    by: str,
    end_reason: str,
    kind: AuditKind,
    revoke_reason: str = "revoked",
    details: Mapping[str, str] | None = None,
    expected: Iterable[GrantState] = ENDABLE_GRANT_STATES,
    failure: str = "",
) -> tuple[list[Grant], list[Command]]:
    """End `grants`: those still in an `expected` state move to REVOKING with a revoke command
    each (or, with `failure`, straight to REVOKE_FAILED: their agent can never acknowledge a
    revoke), and each gets one `kind` audit event. Returns the grants moved, as they are now,
    and the revoke commands to push once committed."""
    if not grants:
        return [], []
    state = GrantState.REVOKE_FAILED if failure else GrantState.REVOKING
    change = GrantChange(
        ended_by=by,
        end_reason=end_reason,
        failure=failure or None,
        ended_at=now if failure else None,
    )
    moved = await tx.move_grants(
        [g.id for g in grants], expected=list(expected), state=state, change=change
    )
    ending = [g for g in grants if g.id in moved]
    seqs: dict[str, int] = {}
    if not failure:
        seqs = await tx.append_revokes(ending, now, revoke_reason)
    ended = [
        replace(
            g,
            state=state,
            revoke_seq=seqs.get(g.id, g.revoke_seq),
            ended_by=by,
            end_reason=end_reason,
            failure=failure or g.failure,
            ended_at=now if failure else g.ended_at,
        )
        for g in ending
    ]
    extra = dict(details or {})
    await tx.audit_many(
        [
            AuditEntry(
                kind,
                by,
                now,
                subject=g.subject,
                agent=g.agent,
                request_id=g.request_id,
                grant_id=g.id,
                details={
                    "action": g.action,
                    **extra,
                    **({"seq": str(seqs[g.id])} if g.id in seqs else {}),
                },
            )
            for g in ended
        ]
    )
    commands = [
        Command(g.agent, g.revoke_seq, CommandKind.REVOKE, g, revoke_reason)
        for g in ended
        if g.id in seqs
    ]
    return ended, commands


def extension_problem(rule: Rule, grant: Grant, by: timedelta) -> str:
    """Why `rule` does not let `grant` end `by` later ('' when it does): the count of
    extensions and the total length from the grant's start are bounded."""
    limits = rule.extend
    if grant.extensions >= limits.max_count:
        return f"rule {rule.name} allows at most {limits.max_count} extension(s) of a grant"
    total = limits.max_total or rule.max_duration
    if grant.not_after + by - grant.not_before > total:
        left = total - (grant.not_after - grant.not_before)
        return (
            f"rule {rule.name} allows at most {format_duration(total)} in all from the grant's "
            f"start ({format_duration(max(left, timedelta(0)))} left to extend)"
            if left > timedelta(0)
            else f"rule {rule.name} allows at most {format_duration(total)} in all from the "
            "grant's start, which this grant has reached"
        )
    return ""


async def extend_grant(
    tx: Tx, grant: Grant, by: timedelta, now: datetime, *, actor: str, reason: str, rule: str
) -> tuple[Grant, Command] | None:
    """Move a live grant's end `by` later in place, with its command and its audit
    (`grant.extended`; never a second grant.applied). None when it changed meanwhile."""
    not_after = grant.not_after + by
    if not await tx.extend_grant(grant.id, expected_not_after=grant.not_after, not_after=not_after):
        return None
    seq = await tx.append_command(grant.agent, CommandKind.EXTEND, grant.id, now)
    extended = replace(
        grant,
        not_after=not_after,
        extensions=grant.extensions + 1,
        original_not_after=grant.original_not_after or grant.not_after,
    )
    details = {
        "action": grant.action,
        "from": rfc3339(grant.not_after),
        "not_after": rfc3339(not_after),
        "by": format_duration(by),
        "extension": str(extended.extensions),
        "rule": rule,
        "seq": str(seq),
    }
    if reason:
        details["reason"] = reason
    await tx.audit(
        AuditEntry(
            AuditKind.GRANT_EXTENDED,
            actor,
            now,
            subject=grant.subject,
            agent=grant.agent,
            request_id=grant.request_id,
            grant_id=grant.id,
            details=details,
        )
    )
    return extended, Command(grant.agent, seq, CommandKind.EXTEND, extended)
