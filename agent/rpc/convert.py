"""Protobuf to agent domain types and back. Everything from the wire is validated here."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from agent.domain.breakglass import KeptLock, Use
from agent.domain.commands import (
    Ack,
    AckStatus,
    CommandSpec,
    GrantSpec,
    LockSpec,
    RevokeReason,
    RevokeSpec,
    SnapshotSpec,
    UnlockSpec,
)
from agent.domain.errors import MalformedCommand
from agent.domain.leases import EventKind, OutboxEvent
from jitmesh import validation
from jitmesh.clock import EPOCH, from_ms, to_ms
from jitmesh.durations import MAX_DURATION
from jitmesh.types import OfflineMode, OfflinePolicy
from jitmesh.v1 import agentlink_pb2, types_pb2

# 9999-12-31T23:59:59Z: the last second a datetime can hold.
_MAX_SECONDS = 253_402_300_799
# A coordinator replica's id as the agent logs it (longer ones are cut).
MAX_REPLICA = 64

_ACK_STATUS = {
    AckStatus.APPLIED: agentlink_pb2.ACK_STATUS_APPLIED,
    AckStatus.FAILED: agentlink_pb2.ACK_STATUS_FAILED,
    AckStatus.REJECTED: agentlink_pb2.ACK_STATUS_REJECTED,
    AckStatus.DUPLICATE: agentlink_pb2.ACK_STATUS_DUPLICATE,
    AckStatus.NOT_APPLIED: agentlink_pb2.ACK_STATUS_NOT_APPLIED,
}
_REVOKE_REASON = {
    agentlink_pb2.REVOKE_REASON_REVOKED: RevokeReason.REVOKED,
    agentlink_pb2.REVOKE_REASON_RELEASED: RevokeReason.RELEASED,
    agentlink_pb2.REVOKE_REASON_EXPIRED: RevokeReason.EXPIRED,
    agentlink_pb2.REVOKE_REASON_AGENT_REMOVED: RevokeReason.AGENT_REMOVED,
}


def to_timestamp(at: datetime) -> Timestamp:
    ms = to_ms(at)
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def from_timestamp(ts: Timestamp, field: str) -> datetime:
    """Timestamp to an aware UTC datetime, truncated to the millisecond (the stored precision)."""
    if not 0 <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise MalformedCommand(f"{field} is out of range")
    return from_ms(ts.seconds * 1000 + ts.nanos // 1_000_000)


def from_duration(d: Duration, field: str) -> timedelta:
    if d.seconds < 0 or d.nanos < 0 or d.seconds > MAX_DURATION.total_seconds():
        raise MalformedCommand(f"{field} is out of range")
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def command_from_pb(seq: int, body: agentlink_pb2.CommandBody) -> CommandSpec:
    kind = body.WhichOneof("kind")
    spec: GrantSpec | RevokeSpec | SnapshotSpec | LockSpec | UnlockSpec
    if kind == "grant":
        spec = grant_from_pb(body.grant)
    elif kind == "revoke":
        spec = RevokeSpec(
            grant_id=_check(validation.ID, body.revoke.grant_id, "grant_id"),
            # A revoke is always safe to honour, whatever reason a newer coordinator gives.
            reason=_REVOKE_REASON.get(body.revoke.reason, RevokeReason.REVOKED),
        )
    elif kind == "snapshot":
        spec = SnapshotSpec(
            grants=tuple(grant_from_pb(g) for g in body.snapshot.grants),
            tombstones=tuple(
                _check(validation.ID, t, "tombstone grant_id") for t in body.snapshot.tombstones
            ),
            locks=tuple(kept_lock(x) for x in body.snapshot.locks)
            if body.snapshot.locks_complete
            else None,
        )
    elif kind == "lock":
        spec = LockSpec(kept_lock(body.lock))
    elif kind == "unlock":
        spec = UnlockSpec(_check(validation.ID, body.unlock.lock_id, "lock_id"))
    elif kind == "extend":
        # Never sent: extensions come as grant commands of the same id (docs/wire.md).
        raise MalformedCommand("extend commands are not used: an extension is a grant command")
    else:
        raise MalformedCommand("command has no kind")
    return CommandSpec(
        seq=seq,
        agent=body.agent,
        body_seq=body.seq,
        epoch=body.epoch,
        kind=spec,
        issued_at=from_timestamp(body.issued_at, "issued_at")
        if body.HasField("issued_at")
        else None,
        # Signed, so not forged; cut short all the same (it only goes into log lines).
        replica=body.replica[:MAX_REPLICA],
    )


def kept_lock(lock: agentlink_pb2.LockCommand) -> KeptLock:
    return KeptLock(
        lock_id=_check(validation.ID, lock.lock_id, "lock_id"),
        subject=_check(validation.SUBJECT, lock.subject, "lock subject") if lock.subject else "",
        action=_check(validation.ACTION, lock.action, "lock action") if lock.action else "",
        expires_at=from_timestamp(lock.expires_at, "lock expires_at")
        if lock.HasField("expires_at")
        else None,
        reason=lock.reason[:256],
    )


def grant_from_pb(g: agentlink_pb2.GrantCommand) -> GrantSpec:
    if not g.HasField("not_after"):
        # A grant without an end is refused, never taken as forever.
        raise MalformedCommand("grant has no not_after")
    return GrantSpec(
        grant_id=_check(validation.ID, g.grant_id, "grant_id"),
        subject=_check(validation.SUBJECT, g.subject, "subject"),
        action=_check(validation.ACTION, g.action, "action"),
        # No not_before: valid from the start; not_after still bounds it.
        not_before=(
            from_timestamp(g.not_before, "not_before") if g.HasField("not_before") else EPOCH
        ),
        not_after=from_timestamp(g.not_after, "not_after"),
        offline=_offline(g.offline),
        request_id=_check(validation.ID, g.request_id, "request_id") if g.request_id else "",
    )


def _offline(policy: types_pb2.OfflinePolicy) -> OfflinePolicy:
    if policy.mode in (types_pb2.OFFLINE_MODE_UNSPECIFIED, types_pb2.OFFLINE_MODE_HOLD):
        return OfflinePolicy(OfflineMode.HOLD)
    if policy.mode == types_pb2.OFFLINE_MODE_REVOKE_AFTER:
        return OfflinePolicy(OfflineMode.REVOKE_AFTER, from_duration(policy.grace, "offline grace"))
    raise MalformedCommand("offline mode is unknown")


def _check(pattern: re.Pattern[str], value: str, field: str) -> str:
    try:
        return validation.check(pattern, value, field)
    except validation.ValidationError as exc:
        raise MalformedCommand(str(exc)) from None


def ack_to_pb(ack: Ack) -> agentlink_pb2.AgentMessage:
    return agentlink_pb2.AgentMessage(
        ack=agentlink_pb2.Ack(
            seq=ack.seq,
            status=_ACK_STATUS[ack.status],
            reason=ack.reason,
            grant_id=ack.grant_id,
            results=[
                agentlink_pb2.GrantResult(
                    grant_id=r.grant_id,
                    status=_ACK_STATUS[r.status],
                    reason=r.reason,
                    applied_at=to_timestamp(r.applied_at) if r.applied_at else None,
                )
                for r in ack.results
            ],
        )
    )


def acks_to_pb(acks: Sequence[Ack]) -> agentlink_pb2.AgentMessage:
    """Several acks in one message (wire 0.2 and later), in order."""
    return agentlink_pb2.AgentMessage(
        acks=agentlink_pb2.AckBatch(acks=[ack_to_pb(a).ack for a in acks])
    )


def event_to_pb(event: OutboxEvent) -> agentlink_pb2.AgentMessage:
    message = agentlink_pb2.AgentEvent(
        event_id=event.event_id,
        kind=event.kind,
        grant_id=event.grant_id,
        subject=event.subject,
        action=event.action,
        observed_at=to_timestamp(event.observed_at),
        details=dict(event.details),
        counter=event.counter,
    )
    # Since 0.2 some kinds carry typed details too (the map keeps the text copy).
    if event.kind in (EventKind.EXEC_STARTED, EventKind.EXEC_EXITED):
        message.exec.CopyFrom(_exec_record(event.details))
    elif event.kind == EventKind.SESSIONS_ENDED:
        d = event.details
        message.sessions.CopyFrom(
            agentlink_pb2.SessionsEnded(
                user=d.get("user", ""),
                processes=_int(d.get("processes"), 0, 2**32 - 1),
                cause=d.get("cause", ""),
                scope=d.get("scope", ""),
            )
        )
    elif event.kind == EventKind.BREAKGLASS_USED:
        # The spent code travels in the typed detail only, never in the text copy (which the
        # coordinator may store in its audit log as it is).
        details = dict(event.details)
        code = details.pop("code", "")
        message.details.clear()
        message.details.update(details)
        message.breakglass.CopyFrom(
            agentlink_pb2.BreakglassUse(
                code_id=details.get("code_id", ""),
                code=_unb64(code),
                grant_id=event.grant_id,
                subject=event.subject,
                action=event.action,
                used_at=to_timestamp(event.observed_at),
                not_after=_ts_or_none(details.get("not_after", "")),
                caller=details.get("caller", ""),
            )
        )
    return agentlink_pb2.AgentMessage(event=message)


def breakglass_use_to_pb(use: Use) -> agentlink_pb2.BreakglassUse:
    return agentlink_pb2.BreakglassUse(
        code_id=use.code_id,
        code=use.code,
        grant_id=use.grant_id,
        subject=use.subject,
        action=use.action,
        used_at=to_timestamp(use.used_at),
        not_after=to_timestamp(use.not_after),
        caller=use.caller,
    )


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return b""


def _ts_or_none(text: str) -> Timestamp | None:
    try:
        return to_timestamp(datetime.fromisoformat(text))
    except ValueError:
        return None


def _exec_record(d: Mapping[str, str]) -> agentlink_pb2.ExecRecord:
    record = agentlink_pb2.ExecRecord(
        run_id=d.get("run_id", ""),
        command=d.get("command", ""),
        argc=_int(d.get("argc"), 0, 2**32 - 1),
        run_as=d.get("run_as", ""),
        pid=_int(d.get("pid"), 0, 2**63 - 1),
        exit_code=_int(d.get("exit_code"), -(2**31), 2**31 - 1),
        signal=d.get("signal", ""),
        cause=d.get("cause", ""),
        released=d.get("released") == "true",
    )
    if "duration_ms" in d:
        record.duration.FromMilliseconds(_int(d.get("duration_ms"), 0, 2**40))
    return record


def _int(text: str | None, low: int, high: int) -> int:
    try:
        value = int(text or 0)
    except ValueError:
        return 0
    return min(max(value, low), high)


def hello_to_pb(
    *,
    agent: str,
    labels: Mapping[str, str],
    last_applied_seq: int,
    active_grant_ids: Sequence[str],
    version: str,
    epoch: int,
    boot_id: str,
    agent_time: datetime,
    removing_grant_ids: Sequence[str] = (),
    breakglass: Sequence[Use] = (),
) -> agentlink_pb2.AgentMessage:
    return agentlink_pb2.AgentMessage(
        hello=agentlink_pb2.Hello(
            agent=agent,
            labels=dict(labels),
            last_applied_seq=last_applied_seq,
            active_grant_ids=list(active_grant_ids),
            version=version,
            epoch=epoch,
            boot_id=boot_id,
            agent_time=to_timestamp(agent_time),
            removing_grant_ids=list(removing_grant_ids),
            breakglass=[breakglass_use_to_pb(use) for use in breakglass],
        )
    )


def heartbeat_to_pb(sent_at: datetime) -> agentlink_pb2.AgentMessage:
    return agentlink_pb2.AgentMessage(
        heartbeat=agentlink_pb2.Heartbeat(sent_at=to_timestamp(sent_at))
    )


def retry_after(metadata: Iterable[Any] | None) -> float | None:
    """Seconds from a RESOURCE_EXHAUSTED answer's status details (`grpc-status-details-bin`:
    a google.rpc.Status with our RetryHint or a standard RetryInfo); None without either."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed detail is no hint
            return None
        for detail in status.details:
            hint, info = agentlink_pb2.RetryHint(), error_details_pb2.RetryInfo()
            if detail.Is(hint.DESCRIPTOR) and detail.Unpack(hint):
                return duration_seconds(hint.retry_after)
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                return duration_seconds(info.retry_delay)
    return None


def duration_seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9
