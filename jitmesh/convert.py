"""Protobuf messages to `jitmesh.types` values and back.

The only module of the SDK that reads or builds `jitmesh.v1` messages field by field. The
`from_*` direction is what the client uses; the `*_to_proto` direction serves the client's own
requests (enums, durations) and lets tests and scripted servers build wire messages from value
types, which keeps both directions honest through round-trip tests.

Instants become aware UTC datetimes. An unset timestamp and the zero timestamp both read as "not
set": no jitmesh instant is ever the Unix epoch, and a coordinator that stores 0 for "none" and
converts it blindly must not show up as 1970.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh import types
from jitmesh.errors import InternalError
from jitmesh.v1 import (
    access_pb2,
    agents_pb2,
    audit_pb2,
    breakglass_pb2,
    identity_pb2,
    locks_pb2,
    policy_pb2,
    types_pb2,
)

# ---------------------------------------------------------------------------------------------
# Scalars


def time_or_none(value: Timestamp) -> datetime | None:
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


def required_time(value: Timestamp, what: str) -> datetime:
    result = time_or_none(value)
    if result is None:
        raise InternalError(f"the coordinator sent {what} without a time")
    return result


def time_to_proto(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        # A naive datetime would be read as local time by protobuf: refuse rather than guess.
        raise ValueError("naive datetime")
    # Whole microseconds since the epoch, exactly (no float); several per pushed command, so
    # cheaper than Timestamp.FromDatetime's calendar arithmetic.
    micros = (value - _EPOCH) // _MICROSECOND
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def duration_or_none(value: Duration) -> timedelta | None:
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToTimedelta()


def duration(value: Duration) -> timedelta:
    return value.ToTimedelta()


def duration_to_proto(value: timedelta | None) -> Duration | None:
    if value is None:
        return None
    result = Duration()
    result.FromTimedelta(value)
    return result


# ---------------------------------------------------------------------------------------------
# Enums: wire names are the Python names with a prefix (REQUEST_STATE_PENDING <-> PENDING).
# Mapping by name rather than by number keeps one source of truth (the .proto) for both sides.

_REQUEST_STATE = "REQUEST_STATE_"
_GRANT_STATE = "GRANT_STATE_"
_DECISION = "REVIEW_DECISION_"
_OFFLINE = "OFFLINE_MODE_"


def _enum_name(wrapper_name: str, number: int, prefix: str) -> str | None:
    """The suffix of a known, specified enum number; None for UNSPECIFIED."""
    enum = types_pb2.DESCRIPTOR.enum_types_by_name[wrapper_name]
    value = enum.values_by_number.get(number)
    if value is None:
        raise InternalError(
            f"the coordinator sent an unknown {wrapper_name} ({number}); "
            "this client may be older than the coordinator"
        )
    suffix = value.name.removeprefix(prefix)
    return None if suffix == "UNSPECIFIED" else suffix


def request_state(number: int) -> types.RequestState:
    name = _enum_name("RequestState", number, _REQUEST_STATE)
    if name is None:
        raise InternalError("the coordinator sent a request without a state")
    return types.RequestState(name)


def request_state_to_proto(state: types.RequestState) -> types_pb2.RequestState.ValueType:
    return types_pb2.RequestState.Value(_REQUEST_STATE + state.value)


def grant_state_or_none(number: int) -> types.GrantState | None:
    name = _enum_name("GrantState", number, _GRANT_STATE)
    return None if name is None else types.GrantState(name)


def grant_state(number: int) -> types.GrantState:
    state = grant_state_or_none(number)
    if state is None:
        raise InternalError("the coordinator sent a grant without a state")
    return state


def grant_state_to_proto(state: types.GrantState | None) -> types_pb2.GrantState.ValueType:
    if state is None:
        return types_pb2.GRANT_STATE_UNSPECIFIED
    return types_pb2.GrantState.Value(_GRANT_STATE + state.value)


def review_decision(number: int) -> types.ReviewDecision:
    name = _enum_name("ReviewDecision", number, _DECISION)
    if name is None:
        raise InternalError("the coordinator sent a review without a decision")
    return types.ReviewDecision(name)


def review_decision_to_proto(
    decision: types.ReviewDecision,
) -> types_pb2.ReviewDecision.ValueType:
    return types_pb2.ReviewDecision.Value(_DECISION + decision.value)


def offline_mode(number: int) -> types.OfflineMode:
    name = _enum_name("OfflineMode", number, _OFFLINE)
    # Unspecified is what an older coordinator sends; HOLD is the documented default.
    return types.OfflineMode.HOLD if name is None else types.OfflineMode(name)


def offline_mode_to_proto(mode: types.OfflineMode) -> types_pb2.OfflineMode.ValueType:
    return types_pb2.OfflineMode.Value(_OFFLINE + mode.value)


# ---------------------------------------------------------------------------------------------
# Messages


def offline_policy(msg: types_pb2.OfflinePolicy) -> types.OfflinePolicy:
    return types.OfflinePolicy(mode=offline_mode(msg.mode), grace=duration(msg.grace))


def offline_policy_to_proto(value: types.OfflinePolicy) -> types_pb2.OfflinePolicy:
    return types_pb2.OfflinePolicy(
        mode=offline_mode_to_proto(value.mode), grace=duration_to_proto(value.grace)
    )


def review(msg: types_pb2.Review) -> types.Review:
    return types.Review(
        reviewer=msg.reviewer,
        decision=review_decision(msg.decision),
        reason=msg.reason,
        reviewed_at=required_time(msg.reviewed_at, "a review"),
        stage=msg.stage,
        via=msg.via,
    )


def review_to_proto(value: types.Review) -> types_pb2.Review:
    return types_pb2.Review(
        reviewer=value.reviewer,
        decision=review_decision_to_proto(value.decision),
        reason=value.reason,
        reviewed_at=time_to_proto(value.reviewed_at),
        stage=value.stage,
        via=value.via,
    )


def _stage_mode(number: int) -> types.StageMode:
    return types.StageMode.ALL if number == types_pb2.STAGE_MODE_ALL else types.StageMode.ANY


def approval_stage(msg: types_pb2.ApprovalStage) -> types.ApprovalStage:
    return types.ApprovalStage(
        name=msg.name,
        approvals=msg.approvals,
        mode=_stage_mode(msg.mode),
        groups=tuple(msg.groups),
        users=tuple(msg.users),
        timeout=duration_or_none(msg.timeout),
        escalation_groups=tuple(msg.escalation_groups),
    )


def approval_stage_to_proto(value: types.ApprovalStage) -> types_pb2.ApprovalStage:
    return types_pb2.ApprovalStage(
        name=value.name,
        approvals=value.approvals,
        mode=types_pb2.STAGE_MODE_ALL
        if value.mode is types.StageMode.ALL
        else types_pb2.STAGE_MODE_ANY,
        groups=value.groups,
        users=value.users,
        timeout=duration_to_proto(value.timeout),
        escalation_groups=value.escalation_groups,
    )


def approval_plan(msg: types_pb2.ApprovalPlan) -> types.ApprovalPlan:
    return types.ApprovalPlan(
        policy_version=msg.policy_version,
        rule=msg.rule,
        stages=tuple(approval_stage(s) for s in msg.stages),
        pending_ttl=duration_or_none(msg.pending_ttl),
        reason_required=msg.reason_required,
        ticket_pattern=msg.ticket_pattern,
        automatic=msg.automatic,
    )


def approval_plan_to_proto(value: types.ApprovalPlan) -> types_pb2.ApprovalPlan:
    return types_pb2.ApprovalPlan(
        policy_version=value.policy_version,
        rule=value.rule,
        stages=[approval_stage_to_proto(s) for s in value.stages],
        pending_ttl=duration_to_proto(value.pending_ttl),
        reason_required=value.reason_required,
        ticket_pattern=value.ticket_pattern,
        automatic=value.automatic,
    )


def request(msg: types_pb2.AccessRequest) -> types.Request:
    return types.Request(
        id=msg.id,
        subject=msg.subject,
        agent=msg.agent,
        action=msg.action,
        duration=duration(msg.duration),
        reason=msg.reason,
        state=request_state(msg.state),
        rule=msg.rule,
        approvals_required=msg.approvals_required,
        approver_groups=tuple(msg.approver_groups),
        reviews=tuple(review(r) for r in msg.reviews),
        created_at=required_time(msg.created_at, "a request"),
        pending_expires_at=time_or_none(msg.pending_expires_at),
        decided_at=time_or_none(msg.decided_at),
        decided_by=msg.decided_by,
        decision_reason=msg.decision_reason,
        grant_id=msg.grant_id,
        grant_state=grant_state_or_none(msg.grant_state),
        plan=approval_plan(msg.plan) if msg.HasField("plan") else None,
        ticket=msg.ticket,
        current_stage=msg.current_stage,
        start_at=time_or_none(msg.start_at),
        selector=dict(msg.selector),
        grant_ids=tuple(msg.grant_ids),
        reused=msg.reused,
        extends_grant_id=msg.extends_grant_id,
        change_seq=msg.change_seq,
        link=msg.link,
    )


def request_to_proto(value: types.Request) -> types_pb2.AccessRequest:
    return types_pb2.AccessRequest(
        id=value.id,
        subject=value.subject,
        agent=value.agent,
        action=value.action,
        duration=duration_to_proto(value.duration),
        reason=value.reason,
        state=request_state_to_proto(value.state),
        rule=value.rule,
        approvals_required=value.approvals_required,
        approver_groups=value.approver_groups,
        reviews=[review_to_proto(r) for r in value.reviews],
        created_at=time_to_proto(value.created_at),
        pending_expires_at=time_to_proto(value.pending_expires_at),
        decided_at=time_to_proto(value.decided_at),
        decided_by=value.decided_by,
        decision_reason=value.decision_reason,
        grant_id=value.grant_id,
        grant_state=grant_state_to_proto(value.grant_state),
        plan=approval_plan_to_proto(value.plan) if value.plan is not None else None,
        ticket=value.ticket,
        current_stage=value.current_stage,
        start_at=time_to_proto(value.start_at),
        selector=value.selector,
        grant_ids=value.grant_ids,
        reused=value.reused,
        extends_grant_id=value.extends_grant_id,
        change_seq=value.change_seq,
        link=value.link,
    )


def grant(msg: types_pb2.Grant) -> types.Grant:
    return types.Grant(
        id=msg.id,
        request_id=msg.request_id,
        agent=msg.agent,
        subject=msg.subject,
        action=msg.action,
        not_before=required_time(msg.not_before, "a grant"),
        not_after=required_time(msg.not_after, "a grant"),
        state=grant_state(msg.state),
        offline=offline_policy(msg.offline),
        created_at=required_time(msg.created_at, "a grant"),
        ended_at=time_or_none(msg.ended_at),
        ended_by=msg.ended_by,
        end_reason=msg.end_reason,
        grant_seq=msg.grant_seq,
        revoke_seq=msg.revoke_seq,
        applied_at=time_or_none(msg.applied_at),
        failure=msg.failure,
        epoch=msg.epoch,
        extensions=msg.extensions,
        original_not_after=time_or_none(msg.original_not_after),
        breakglass_code_id=msg.breakglass_code_id,
    )


def grant_to_proto(value: types.Grant) -> types_pb2.Grant:
    return types_pb2.Grant(
        id=value.id,
        request_id=value.request_id,
        agent=value.agent,
        subject=value.subject,
        action=value.action,
        not_before=time_to_proto(value.not_before),
        not_after=time_to_proto(value.not_after),
        state=grant_state_to_proto(value.state),
        offline=offline_policy_to_proto(value.offline),
        created_at=time_to_proto(value.created_at),
        ended_at=time_to_proto(value.ended_at),
        ended_by=value.ended_by,
        end_reason=value.end_reason,
        grant_seq=value.grant_seq,
        revoke_seq=value.revoke_seq,
        applied_at=time_to_proto(value.applied_at),
        failure=value.failure,
        epoch=value.epoch,
        extensions=value.extensions,
        original_not_after=time_to_proto(value.original_not_after),
        breakglass_code_id=value.breakglass_code_id,
    )


def agent(msg: types_pb2.Agent) -> types.Agent:
    return types.Agent(
        name=msg.name,
        labels=dict(msg.labels),
        connected=msg.connected,
        last_seen_at=time_or_none(msg.last_seen_at),
        enrolled_at=time_or_none(msg.enrolled_at),
        version=msg.version,
        last_acked_seq=msg.last_acked_seq,
        last_seq=msg.last_seq,
        active_grants=msg.active_grants,
        replica=msg.replica,
        compatibility=msg.compatibility,
    )


def agent_to_proto(value: types.Agent) -> types_pb2.Agent:
    return types_pb2.Agent(
        name=value.name,
        labels=value.labels,
        connected=value.connected,
        last_seen_at=time_to_proto(value.last_seen_at),
        enrolled_at=time_to_proto(value.enrolled_at),
        version=value.version,
        last_acked_seq=value.last_acked_seq,
        last_seq=value.last_seq,
        active_grants=value.active_grants,
        replica=value.replica,
        compatibility=value.compatibility,
    )


def join_token(msg: agents_pb2.CreateJoinTokenResponse) -> types.JoinToken:
    return types.JoinToken(
        token=msg.token,
        expires_at=required_time(msg.expires_at, "a join token"),
        id=msg.id,
        labels=dict(msg.labels),
        replaces=msg.replaces,
    )


def join_token_to_proto(value: types.JoinToken) -> agents_pb2.CreateJoinTokenResponse:
    return agents_pb2.CreateJoinTokenResponse(
        token=value.token,
        expires_at=time_to_proto(value.expires_at),
        id=value.id,
        labels=value.labels,
        replaces=value.replaces,
    )


def user_info(msg: identity_pb2.UserInfo) -> types.UserInfo:
    return types.UserInfo(
        name=msg.name,
        groups=tuple(msg.groups),
        disabled=msg.disabled,
        created_at=required_time(msg.created_at, "a user"),
        managed_by=msg.managed_by or "local",
    )


def user_info_to_proto(value: types.UserInfo) -> identity_pb2.UserInfo:
    return identity_pb2.UserInfo(
        name=value.name,
        groups=list(value.groups),
        disabled=value.disabled,
        managed_by=value.managed_by,
        created_at=time_to_proto(value.created_at),
    )


def join_token_info(msg: agents_pb2.JoinTokenInfo) -> types.JoinTokenInfo:
    return types.JoinTokenInfo(
        id=msg.id,
        labels=dict(msg.labels),
        replaces=msg.replaces,
        created_by=msg.created_by,
        created_at=required_time(msg.created_at, "a join token"),
        expires_at=time_or_none(msg.expires_at),
        uses_left=msg.uses_left if msg.HasField("uses_left") else None,
        revoked_at=time_or_none(msg.revoked_at),
        revoked_by=msg.revoked_by,
        used_by=tuple(msg.used_by),
    )


def join_token_info_to_proto(value: types.JoinTokenInfo) -> agents_pb2.JoinTokenInfo:
    return agents_pb2.JoinTokenInfo(
        id=value.id,
        labels=value.labels,
        replaces=value.replaces,
        created_by=value.created_by,
        created_at=time_to_proto(value.created_at),
        expires_at=time_to_proto(value.expires_at),
        uses_left=value.uses_left,
        revoked_at=time_to_proto(value.revoked_at),
        revoked_by=value.revoked_by,
        used_by=list(value.used_by),
    )


def audit_event(msg: types_pb2.AuditEvent) -> types.AuditEvent:
    return types.AuditEvent(
        seq=msg.seq,
        id=msg.id,
        at=required_time(msg.at, "an audit event"),
        actor=msg.actor,
        kind=msg.kind,
        subject=msg.subject,
        agent=msg.agent,
        request_id=msg.request_id,
        grant_id=msg.grant_id,
        details=dict(msg.details),
        prev_hash=msg.prev_hash,
        hash=msg.hash,
    )


def audit_event_to_proto(value: types.AuditEvent) -> types_pb2.AuditEvent:
    return types_pb2.AuditEvent(
        seq=value.seq,
        id=value.id,
        at=time_to_proto(value.at),
        actor=value.actor,
        kind=value.kind,
        subject=value.subject,
        agent=value.agent,
        request_id=value.request_id,
        grant_id=value.grant_id,
        details=value.details,
        prev_hash=value.prev_hash,
        hash=value.hash,
    )


def policy_document(msg: policy_pb2.PolicyDocument) -> types.PolicyDocument:
    return types.PolicyDocument(
        yaml=msg.yaml,
        version=msg.version,
        sha256=msg.sha256,
        applied_at=time_or_none(msg.applied_at),
        applied_by=msg.applied_by,
    )


def policy_document_to_proto(value: types.PolicyDocument) -> policy_pb2.PolicyDocument:
    return policy_pb2.PolicyDocument(
        yaml=value.yaml,
        version=value.version,
        sha256=value.sha256,
        applied_at=time_to_proto(value.applied_at),
        applied_by=value.applied_by,
    )


def policy_decision(msg: policy_pb2.TestPolicyResponse) -> types.PolicyDecision:
    return types.PolicyDecision(
        allowed=msg.allowed,
        rule=msg.rule,
        explanation=msg.explanation,
        approval_required=msg.approval_required,
        approvals_required=msg.approvals_required,
        approver_groups=tuple(msg.approver_groups),
        max_duration=duration_or_none(msg.max_duration),
        reason_required=msg.reason_required,
        trace=tuple(msg.trace),
        plan=approval_plan(msg.plan) if msg.HasField("plan") else None,
        policy_version=msg.policy_version,
    )


def policy_decision_to_proto(value: types.PolicyDecision) -> policy_pb2.TestPolicyResponse:
    return policy_pb2.TestPolicyResponse(
        allowed=value.allowed,
        rule=value.rule,
        explanation=value.explanation,
        approval_required=value.approval_required,
        approvals_required=value.approvals_required,
        approver_groups=value.approver_groups,
        max_duration=duration_to_proto(value.max_duration),
        reason_required=value.reason_required,
        trace=value.trace,
        plan=approval_plan_to_proto(value.plan) if value.plan is not None else None,
        policy_version=value.policy_version,
    )


def chain_verification(msg: audit_pb2.VerifyChainResponse) -> types.ChainVerification:
    return types.ChainVerification(
        ok=msg.ok,
        events_checked=msg.events_checked,
        first_bad_seq=msg.first_bad_seq,
        problem=msg.problem,
        head_hash=msg.head_hash,
    )


def chain_verification_to_proto(value: types.ChainVerification) -> audit_pb2.VerifyChainResponse:
    return audit_pb2.VerifyChainResponse(
        ok=value.ok,
        events_checked=value.events_checked,
        first_bad_seq=value.first_bad_seq,
        problem=value.problem,
        head_hash=value.head_hash,
    )


def lock_target(msg: locks_pb2.LockTarget) -> types.LockTarget:
    return types.LockTarget(subject=msg.subject, agent=msg.agent, action=msg.action)


def lock_target_to_proto(value: types.LockTarget) -> locks_pb2.LockTarget:
    return locks_pb2.LockTarget(subject=value.subject, agent=value.agent, action=value.action)


def lock(msg: locks_pb2.Lock) -> types.Lock:
    return types.Lock(
        id=msg.id,
        target=lock_target(msg.target),
        reason=msg.reason,
        created_by=msg.created_by,
        created_at=required_time(msg.created_at, "a lock"),
        expires_at=time_or_none(msg.expires_at),
        lifted_at=time_or_none(msg.lifted_at),
        lifted_by=msg.lifted_by,
        lift_reason=msg.lift_reason,
    )


def lock_to_proto(value: types.Lock) -> locks_pb2.Lock:
    return locks_pb2.Lock(
        id=value.id,
        target=lock_target_to_proto(value.target),
        reason=value.reason,
        created_by=value.created_by,
        created_at=time_to_proto(value.created_at),
        expires_at=time_to_proto(value.expires_at),
        lifted_at=time_to_proto(value.lifted_at),
        lifted_by=value.lifted_by,
        lift_reason=value.lift_reason,
    )


def request_option(msg: access_pb2.RequestOption) -> types.RequestOption:
    return types.RequestOption(
        agent=msg.agent,
        labels=dict(msg.labels),
        action=msg.action,
        max_duration=duration(msg.max_duration),
        plan=approval_plan(msg.plan),
        automatic_left=msg.automatic_left if msg.HasField("automatic_left") else None,
        granted_time_left=duration_or_none(msg.granted_time_left),
        live_grant_id=msg.live_grant_id,
    )


def request_option_to_proto(value: types.RequestOption) -> access_pb2.RequestOption:
    return access_pb2.RequestOption(
        agent=value.agent,
        labels=value.labels,
        action=value.action,
        max_duration=duration_to_proto(value.max_duration),
        plan=approval_plan_to_proto(value.plan),
        automatic_left=value.automatic_left,
        granted_time_left=duration_to_proto(value.granted_time_left),
        live_grant_id=value.live_grant_id,
    )


def breakglass_code(msg: breakglass_pb2.BreakglassCodeInfo) -> types.BreakglassCode:
    return types.BreakglassCode(
        id=msg.id,
        agent=msg.agent,
        subject=msg.subject,
        action=msg.action,
        duration=duration(msg.duration),
        issued_at=required_time(msg.issued_at, "a break-glass code"),
        issued_by=msg.issued_by,
        expires_at=required_time(msg.expires_at, "a break-glass code's expiry"),
        reason=msg.reason,
        used_at=time_or_none(msg.used_at),
        grant_id=msg.grant_id,
        used_by=msg.used_by,
        reviewed_at=time_or_none(msg.reviewed_at),
        reviewed_by=msg.reviewed_by,
        review_note=msg.review_note,
        voided_at=time_or_none(msg.voided_at),
    )


def breakglass_code_to_proto(value: types.BreakglassCode) -> breakglass_pb2.BreakglassCodeInfo:
    return breakglass_pb2.BreakglassCodeInfo(
        id=value.id,
        agent=value.agent,
        subject=value.subject,
        action=value.action,
        duration=duration_to_proto(value.duration),
        issued_at=time_to_proto(value.issued_at),
        issued_by=value.issued_by,
        expires_at=time_to_proto(value.expires_at),
        reason=value.reason,
        used_at=time_to_proto(value.used_at),
        grant_id=value.grant_id,
        used_by=value.used_by,
        reviewed_at=time_to_proto(value.reviewed_at),
        reviewed_by=value.reviewed_by,
        review_note=value.review_note,
        voided_at=time_to_proto(value.voided_at),
    )
