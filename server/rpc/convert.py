"""Coordinator records to protobuf and back. The only place besides handlers that knows protobuf."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh.types import (
    Agent,
    AuditEvent,
    ChainVerification,
    Grant,
    GrantState,
    OfflineMode,
    OfflinePolicy,
    PolicyDecision,
    PolicyDocument,
    Request,
    RequestState,
    ReviewDecision,
)
from jitmesh.v1 import (
    agentlink_pb2,
    audit_pb2,
    policy_pb2,
    types_pb2,
)
from server.domain.models import AgentAck, AgentHello, AgentObservation, Command, CommandKind


def ts(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    out = Timestamp()
    out.FromDatetime(at)
    return out


def from_ts(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def dur(value: timedelta) -> Duration:
    out = Duration()
    out.FromTimedelta(value)
    return out


def from_dur(value: Duration) -> timedelta:
    return value.ToTimedelta()


def request_state(state: RequestState) -> types_pb2.RequestState.ValueType:
    return types_pb2.RequestState.Value(f"REQUEST_STATE_{state.value}")


def grant_state(state: GrantState | None) -> types_pb2.GrantState.ValueType:
    if state is None:
        return types_pb2.GRANT_STATE_UNSPECIFIED
    return types_pb2.GrantState.Value(f"GRANT_STATE_{state.value}")


def request_states(values: list[types_pb2.RequestState.ValueType]) -> list[RequestState]:
    return [
        RequestState(types_pb2.RequestState.Name(x).removeprefix("REQUEST_STATE_"))
        for x in values
        if x
    ]


def grant_states(values: list[types_pb2.GrantState.ValueType]) -> list[GrantState]:
    return [
        GrantState(types_pb2.GrantState.Name(x).removeprefix("GRANT_STATE_")) for x in values if x
    ]


def review_decision(value: types_pb2.ReviewDecision.ValueType) -> ReviewDecision | None:
    if value == types_pb2.REVIEW_DECISION_APPROVE:
        return ReviewDecision.APPROVE
    if value == types_pb2.REVIEW_DECISION_DENY:
        return ReviewDecision.DENY
    return None


def offline(policy: OfflinePolicy) -> types_pb2.OfflinePolicy:
    mode = (
        types_pb2.OFFLINE_MODE_HOLD
        if policy.mode is OfflineMode.HOLD
        else types_pb2.OFFLINE_MODE_REVOKE_AFTER
    )
    return types_pb2.OfflinePolicy(mode=mode, grace=dur(policy.grace))


def request(r: Request) -> types_pb2.AccessRequest:
    return types_pb2.AccessRequest(
        id=r.id,
        subject=r.subject,
        agent=r.agent,
        action=r.action,
        duration=dur(r.duration),
        reason=r.reason,
        state=request_state(r.state),
        rule=r.rule,
        approvals_required=r.approvals_required,
        approver_groups=list(r.approver_groups),
        reviews=[
            types_pb2.Review(
                reviewer=x.reviewer,
                decision=(
                    types_pb2.REVIEW_DECISION_APPROVE
                    if x.decision is ReviewDecision.APPROVE
                    else types_pb2.REVIEW_DECISION_DENY
                ),
                reason=x.reason,
                reviewed_at=ts(x.reviewed_at),
            )
            for x in r.reviews
        ],
        created_at=ts(r.created_at),
        pending_expires_at=ts(r.pending_expires_at),
        decided_at=ts(r.decided_at),
        decided_by=r.decided_by,
        decision_reason=r.decision_reason,
        grant_id=r.grant_id,
        grant_state=grant_state(r.grant_state),
    )


def grant(g: Grant) -> types_pb2.Grant:
    return types_pb2.Grant(
        id=g.id,
        request_id=g.request_id,
        agent=g.agent,
        subject=g.subject,
        action=g.action,
        not_before=ts(g.not_before),
        not_after=ts(g.not_after),
        state=grant_state(g.state),
        offline=offline(g.offline),
        created_at=ts(g.created_at),
        ended_at=ts(g.ended_at),
        ended_by=g.ended_by,
        end_reason=g.end_reason,
        grant_seq=g.grant_seq,
        revoke_seq=g.revoke_seq,
        applied_at=ts(g.applied_at),
        failure=g.failure,
        epoch=g.epoch,
    )


def agent(a: Agent) -> types_pb2.Agent:
    return types_pb2.Agent(
        name=a.name,
        labels=a.labels,
        connected=a.connected,
        last_seen_at=ts(a.last_seen_at),
        enrolled_at=ts(a.enrolled_at),
        version=a.version,
        last_acked_seq=a.last_acked_seq,
        last_seq=a.last_seq,
        active_grants=a.active_grants,
    )


def audit_event(x: AuditEvent) -> types_pb2.AuditEvent:
    return types_pb2.AuditEvent(
        seq=x.seq,
        id=x.id,
        at=ts(x.at),
        actor=x.actor,
        kind=x.kind,
        subject=x.subject,
        agent=x.agent,
        request_id=x.request_id,
        grant_id=x.grant_id,
        details=x.details,
        prev_hash=x.prev_hash,
        hash=x.hash,
    )


def verification(x: ChainVerification) -> audit_pb2.VerifyChainResponse:
    return audit_pb2.VerifyChainResponse(
        ok=x.ok,
        events_checked=x.events_checked,
        first_bad_seq=x.first_bad_seq,
        problem=x.problem,
        head_hash=x.head_hash,
    )


def policy_document(d: PolicyDocument) -> policy_pb2.PolicyDocument:
    return policy_pb2.PolicyDocument(
        yaml=d.yaml,
        version=d.version,
        sha256=d.sha256,
        applied_at=ts(d.applied_at),
        applied_by=d.applied_by,
    )


def policy_decision(d: PolicyDecision) -> policy_pb2.TestPolicyResponse:
    return policy_pb2.TestPolicyResponse(
        allowed=d.allowed,
        rule=d.rule,
        explanation=d.explanation,
        approval_required=d.approval_required,
        approvals_required=d.approvals_required,
        approver_groups=list(d.approver_groups),
        max_duration=dur(d.max_duration) if d.max_duration is not None else None,
        reason_required=d.reason_required,
        trace=list(d.trace),
    )


# The agent stream.


def hello(h: agentlink_pb2.Hello) -> AgentHello:
    return AgentHello(
        name=h.agent,
        labels=dict(h.labels),
        last_applied_seq=h.last_applied_seq,
        active_grant_ids=tuple(h.active_grant_ids),
        version=h.version,
        epoch=h.epoch,
        boot_id=h.boot_id,
        agent_time=from_ts(h.agent_time) if h.HasField("agent_time") else None,
    )


def ack(a: agentlink_pb2.Ack) -> AgentAck:
    status = agentlink_pb2.AckStatus.Name(a.status).removeprefix("ACK_STATUS_")
    return AgentAck(seq=a.seq, status=status, reason=a.reason, grant_id=a.grant_id)


def observation(ev: agentlink_pb2.AgentEvent) -> AgentObservation:
    return AgentObservation(
        event_id=ev.event_id,
        kind=ev.kind,
        grant_id=ev.grant_id,
        subject=ev.subject,
        action=ev.action,
        observed_at=from_ts(ev.observed_at),
        details=dict(ev.details),
    )


_REVOKE_REASONS = {
    "revoked": agentlink_pb2.REVOKE_REASON_REVOKED,
    "released": agentlink_pb2.REVOKE_REASON_RELEASED,
    "expired": agentlink_pb2.REVOKE_REASON_EXPIRED,
    "agent_removed": agentlink_pb2.REVOKE_REASON_AGENT_REMOVED,
}


def grant_command(g: Grant) -> agentlink_pb2.GrantCommand:
    return agentlink_pb2.GrantCommand(
        grant_id=g.id,
        subject=g.subject,
        action=g.action,
        not_before=ts(g.not_before),
        not_after=ts(g.not_after),
        offline=offline(g.offline),
        request_id=g.request_id,
    )


def command_body(c: Command, epoch: int, now: datetime) -> agentlink_pb2.CommandBody:
    body = agentlink_pb2.CommandBody(agent=c.agent, epoch=epoch, seq=c.seq, issued_at=ts(now))
    if c.kind is CommandKind.GRANT:
        body.grant.CopyFrom(grant_command(c.grant))
    else:
        body.revoke.CopyFrom(
            agentlink_pb2.RevokeCommand(
                grant_id=c.grant.id,
                reason=_REVOKE_REASONS.get(c.revoke_reason, agentlink_pb2.REVOKE_REASON_REVOKED),
            )
        )
    return body


def snapshot_body(
    agent_name: str, seq: int, grants: tuple[Grant, ...], epoch: int, now: datetime
) -> agentlink_pb2.CommandBody:
    return agentlink_pb2.CommandBody(
        agent=agent_name,
        epoch=epoch,
        seq=seq,
        issued_at=ts(now),
        snapshot=agentlink_pb2.SnapshotCommand(grants=[grant_command(g) for g in grants]),
    )
