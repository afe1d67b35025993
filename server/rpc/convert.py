"""Coordinator records to protobuf and back.

Requests, grants, agents, audit events and policy answers are `jitmesh.types` values, so their
conversion is the SDK's (`jitmesh.convert`, round-trip tested there); this module adds what only
the coordinator needs: request filters and the agent stream.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh import convert as shared
from jitmesh.errors import JitmeshError
from jitmesh.types import Grant, GrantState, RequestState, ReviewDecision
from jitmesh.v1 import agentlink_pb2, types_pb2
from server.domain.errors import InvalidArgument
from server.domain.models import AgentAck, AgentHello, AgentObservation, Command, CommandKind

request = shared.request_to_proto
grant = shared.grant_to_proto
agent = shared.agent_to_proto
audit_event = shared.audit_event_to_proto
verification = shared.chain_verification_to_proto
policy_document = shared.policy_document_to_proto
policy_decision = shared.policy_decision_to_proto
offline = shared.offline_policy_to_proto


join_token_info = shared.join_token_info_to_proto
user_info = shared.user_info_to_proto


def ts(at: datetime | None) -> Timestamp | None:
    return shared.time_to_proto(at)


def from_ts(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def dur(value: timedelta) -> Duration:
    out = Duration()
    out.FromTimedelta(value)
    return out


def from_dur(value: Duration) -> timedelta:
    return value.ToTimedelta()


def request_states(values: list[types_pb2.RequestState.ValueType]) -> list[RequestState]:
    try:
        return [shared.request_state(x) for x in values if x]
    except JitmeshError:
        raise InvalidArgument("states: unknown request state") from None


def grant_states(values: list[types_pb2.GrantState.ValueType]) -> list[GrantState]:
    try:
        return [shared.grant_state(x) for x in values if x]
    except JitmeshError:
        raise InvalidArgument("states: unknown grant state") from None


def review_decision(value: types_pb2.ReviewDecision.ValueType) -> ReviewDecision | None:
    if value == types_pb2.REVIEW_DECISION_APPROVE:
        return ReviewDecision.APPROVE
    if value == types_pb2.REVIEW_DECISION_DENY:
        return ReviewDecision.DENY
    return None


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
        counter=ev.counter,
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
    if c.kind in (CommandKind.GRANT, CommandKind.EXTEND):
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
