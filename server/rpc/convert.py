"""Coordinator records to protobuf and back.

Requests, grants, agents, audit events and policy answers are `jitmesh.types` values, so their
conversion is the SDK's (`jitmesh.convert`, round-trip tested there); this module adds what only
the coordinator needs: request filters and the agent stream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh import convert as shared
from jitmesh import validation as v
from jitmesh.errors import JitmeshError
from jitmesh.types import Grant, GrantState, Lock, RequestState, ReviewDecision
from jitmesh.v1 import agentlink_pb2, types_pb2
from server.domain.errors import InvalidArgument, invalid_input
from server.domain.models import (
    AckStatus,
    AgentAck,
    AgentHello,
    AgentObservation,
    BreakglassUse,
    Command,
    CommandKind,
    GrantResult,
)

request = shared.request_to_proto
grant = shared.grant_to_proto
request_option = shared.request_option_to_proto
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


# Everything stored must fit SQLite's signed 64-bit INTEGER (docs/wire.md, "Validation").
MAX_INT = 2**63 - 1
# The protobuf Timestamp range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def from_ts(value: Timestamp, field: str = "timestamp") -> datetime:
    """The instant, or InvalidArgument naming `field` for a timestamp out of protobuf's range
    (negative or too large nanos, a year outside 1-9999). Instants are stored as epoch
    milliseconds, which this whole range fits."""
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise InvalidArgument(f"{field} is out of range")
    return value.ToDatetime(tzinfo=UTC)


def number(value: int, field: str, *, low: int = 0) -> int:
    """A uint64/int64 field that must fit the store (and be at least `low`)."""
    if not low <= value <= MAX_INT:
        raise InvalidArgument(f"{field} is out of range")
    return value


def dur(value: timedelta) -> Duration:
    out = Duration()
    out.FromTimedelta(value)
    return out


def from_dur(value: Duration, field: str = "duration") -> timedelta:
    """The duration, or InvalidArgument naming `field` for one outside protobuf's rules (about
    +-10,000 years; nanos within one second and of the same sign as the seconds)."""
    seconds, nanos = value.seconds, value.nanos
    if not (
        abs(seconds) <= 315_576_000_000
        and abs(nanos) < 1_000_000_000
        and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))
    ):
        raise InvalidArgument(f"{field} is out of range")
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


# Every field an agent sends is checked here (docs/wire.md, "Validation at the edge"): a bad one
# is InvalidArgument naming the field, never echoing the value, and ends the stream. Free text
# (reasons, details) is cut and cleaned rather than refused: it comes from hooks and the host.
_SHORT = 64
_EVENT_KIND = re.compile(r"[a-z][a-z0-9._-]{0,47}")
_MAX_IDS = 100_000
_ACK_STATUS = {
    agentlink_pb2.ACK_STATUS_APPLIED: AckStatus.APPLIED,
    agentlink_pb2.ACK_STATUS_FAILED: AckStatus.FAILED,
    agentlink_pb2.ACK_STATUS_REJECTED: AckStatus.REJECTED,
    agentlink_pb2.ACK_STATUS_DUPLICATE: AckStatus.DUPLICATE,
    agentlink_pb2.ACK_STATUS_NOT_APPLIED: AckStatus.NOT_APPLIED,
}


def _text(value: str, limit: int) -> str:
    return "".join(c if c.isprintable() else " " for c in value[:limit])


def _short(value: str, field: str) -> str:
    if len(value) > _SHORT or not value.isprintable():
        raise InvalidArgument(f"{field} is not valid (at most {_SHORT} printable characters)")
    return value


def _grant_ids(values: Sequence[str], field: str) -> tuple[str, ...]:
    if len(values) > _MAX_IDS:
        raise InvalidArgument(f"{field}: too many ids")
    for value in values:
        if not v.ID.fullmatch(value):
            raise InvalidArgument(f"{field}: an id is not valid")
    return tuple(values)


def _grant_id(value: str, field: str = "grant_id") -> str:
    if value and not v.ID.fullmatch(value):
        raise InvalidArgument(f"{field} is not valid")
    return value


def _ack_status(value: int, field: str) -> AckStatus:
    status: AckStatus | None = _ACK_STATUS.get(value)  # type: ignore[call-overload]
    if status is None:
        raise InvalidArgument(f"{field} is not a known ack status")
    return status


def hello(h: agentlink_pb2.Hello) -> AgentHello:
    with invalid_input():
        labels = v.check_labels(dict(h.labels), field="hello labels")
    return AgentHello(
        name=_short(h.agent, "hello agent"),
        labels=labels,
        last_applied_seq=number(h.last_applied_seq, "hello last_applied_seq"),
        active_grant_ids=_grant_ids(h.active_grant_ids, "hello active_grant_ids"),
        version=_short(h.version, "hello version"),
        epoch=number(h.epoch, "hello epoch"),
        boot_id=_short(h.boot_id, "hello boot_id"),
        agent_time=from_ts(h.agent_time, "hello agent_time") if h.HasField("agent_time") else None,
        removing_grant_ids=_grant_ids(h.removing_grant_ids, "hello removing_grant_ids"),
        breakglass=tuple(breakglass_use(u, "hello breakglass") for u in h.breakglass[:100]),
    )


_CODE_ID = re.compile(r"[0-9a-f]{32}")
# A serialized code is a few hundred bytes.
_MAX_CODE = 2048


def breakglass_use(u: agentlink_pb2.BreakglassUse, field: str) -> BreakglassUse:
    """A break-glass use an agent reports: every field checked (the code itself is verified by
    the domain, through the signer)."""
    if not _CODE_ID.fullmatch(u.code_id):
        raise InvalidArgument(f"{field} code_id is not valid")
    if not u.code or len(u.code) > _MAX_CODE:
        raise InvalidArgument(f"{field} code is missing or too long")
    if not (u.HasField("used_at") and u.HasField("not_after")):
        raise InvalidArgument(f"{field} needs used_at and not_after")
    with invalid_input():
        subject = v.check(v.SUBJECT, u.subject, f"{field} subject")
        action = v.check(v.ACTION, u.action, f"{field} action")
    return BreakglassUse(
        code_id=u.code_id,
        code=bytes(u.code),
        grant_id=_grant_id(u.grant_id, f"{field} grant_id") or _missing(f"{field} grant_id"),
        subject=subject,
        action=action,
        used_at=from_ts(u.used_at, f"{field} used_at"),
        not_after=from_ts(u.not_after, f"{field} not_after"),
        caller=_text(u.caller, 64),
    )


def ack(a: agentlink_pb2.Ack, *, legacy: bool = False) -> AgentAck:
    """An agent's ack. `legacy`: from an agent older than wire 0.2, which acks a duplicate as
    APPLIED with reason "duplicate" (also for a command a snapshot had replaced): that is read
    as DUPLICATE, never as an application."""
    status = _ack_status(a.status, "ack status")
    if legacy and status is AckStatus.APPLIED and a.reason == "duplicate":
        status = AckStatus.DUPLICATE
    results = tuple(
        GrantResult(
            grant_id=_grant_id(r.grant_id, "ack result grant_id") or _missing("ack result"),
            status=_ack_status(r.status, "ack result status"),
            reason=_text(r.reason, 256),
            applied_at=from_ts(r.applied_at, "ack result applied_at")
            if r.HasField("applied_at")
            else None,
        )
        for r in a.results
    )
    return AgentAck(
        seq=number(a.seq, "ack seq", low=1),
        status=status,
        reason=_text(a.reason, 256),
        grant_id=_grant_id(a.grant_id, "ack grant_id"),
        results=results,
    )


def _missing(field: str) -> str:
    raise InvalidArgument(f"{field} names no grant")


def observation(ev: agentlink_pb2.AgentEvent) -> AgentObservation:
    if not _EVENT_KIND.fullmatch(ev.kind):
        raise InvalidArgument("event kind is not valid (lower-case letters, digits and ._-)")
    return AgentObservation(
        event_id=ev.event_id,
        kind=ev.kind,
        grant_id=_grant_id(ev.grant_id, "event grant_id"),
        subject=_text(ev.subject, 128),
        action=_text(ev.action, 64),
        observed_at=from_ts(ev.observed_at, "event observed_at")
        if ev.HasField("observed_at")
        else None,
        details={_text(k, 64): _text(val, 256) for k, val in list(ev.details.items())[:16]},
        counter=number(ev.counter, "event counter"),
        breakglass=breakglass_use(ev.breakglass, "event breakglass")
        if ev.WhichOneof("detail") == "breakglass"
        else None,
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


def command_body(
    c: Command, epoch: int, now: datetime, replica: str = ""
) -> agentlink_pb2.CommandBody:
    """`replica`: the replica signing it (covered by the signature: the agent's log names who
    sent what; docs/wire.md, "Epoch, generation and replicas")."""
    body = agentlink_pb2.CommandBody(
        agent=c.agent, epoch=epoch, seq=c.seq, issued_at=ts(now), replica=replica
    )
    if c.kind is CommandKind.LOCK and c.lock is not None:
        body.lock.CopyFrom(lock_command(c.lock))
    elif c.kind in (CommandKind.LOCK, CommandKind.UNLOCK):
        # An unlock (or a lock whose row is gone: it can no longer be in force). Set in place,
        # as the revoke below: one per agent at a fleet-wide lift or lock.
        body.unlock.lock_id = c.lock.id if c.lock is not None else ""
    elif c.grant is None:
        raise ValueError(f"command {c.seq} of {c.agent} names no grant")
    elif c.kind in (CommandKind.GRANT, CommandKind.EXTEND):
        body.grant.CopyFrom(grant_command(c.grant))
    else:
        revoke = body.revoke
        revoke.grant_id = c.grant.id
        revoke.reason = _REVOKE_REASONS.get(c.revoke_reason, agentlink_pb2.REVOKE_REASON_REVOKED)
    return body


def lock_command(lock: Lock) -> agentlink_pb2.LockCommand:
    return agentlink_pb2.LockCommand(
        lock_id=lock.id,
        subject=lock.target.subject,
        action=lock.target.action,
        expires_at=ts(lock.expires_at),
        reason=lock.reason[:256],
    )


def snapshot_body(
    agent_name: str,
    seq: int,
    grants: tuple[Grant, ...],
    epoch: int,
    now: datetime,
    tombstones: tuple[str, ...] = (),
    locks: tuple[Lock, ...] | None = None,
    replica: str = "",
) -> agentlink_pb2.CommandBody:
    """`locks`: every lock in force for the agent (None for a 0.1 agent: no locks at all);
    `replica`: the replica signing it, as in `command_body`."""
    return agentlink_pb2.CommandBody(
        agent=agent_name,
        epoch=epoch,
        seq=seq,
        issued_at=ts(now),
        replica=replica,
        snapshot=agentlink_pb2.SnapshotCommand(
            grants=[grant_command(g) for g in grants],
            tombstones=list(tombstones),
            locks=[lock_command(x) for x in locks or ()],
            locks_complete=locks is not None,
        ),
    )
