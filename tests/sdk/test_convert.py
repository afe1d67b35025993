"""Protobuf <-> jitmesh.types: round trips, enum names, unset and zero timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from jitmesh import convert as _convert
from jitmesh.errors import InternalError
from jitmesh.types import (
    ChainVerification,
    GrantState,
    JoinToken,
    OfflineMode,
    OfflinePolicy,
    PolicyDecision,
    PolicyDocument,
    RequestState,
    Review,
    ReviewDecision,
)
from jitmesh.v1 import types_pb2
from tests.sdk.scripted import NOW, approved, make_agent, make_event, make_grant, make_request


def test_request_round_trip_keeps_every_field() -> None:
    grant = make_grant()
    original = approved(make_request(), grant)
    assert original.reviews  # the round trip covers nested reviews too
    assert _convert.request(_convert.request_to_proto(original)) == original


def test_pending_request_round_trip_keeps_unset_times_and_grant_state() -> None:
    original = make_request(pending_expires_at=None)
    wire = _convert.request_to_proto(original)
    assert not wire.HasField("decided_at")
    assert wire.grant_state == types_pb2.GRANT_STATE_UNSPECIFIED
    back = _convert.request(wire)
    assert back == original
    assert back.decided_at is None
    assert back.pending_expires_at is None
    assert back.grant_state is None


def test_grant_round_trip_keeps_every_field() -> None:
    original = make_grant(
        state=GrantState.REVOKE_FAILED,
        ended_at=NOW + timedelta(minutes=3),
        ended_by="bob",
        end_reason="incident",
        revoke_seq=9,
        failure="sudoers: read-only file system",
    )
    assert _convert.grant(_convert.grant_to_proto(original)) == original


def test_other_messages_round_trip() -> None:
    agent = make_agent(last_seen_at=None, connected=False, compatibility="compat")
    assert _convert.agent(_convert.agent_to_proto(agent)) == agent
    event = make_event(5, details={"a": "1", "b": "2"})
    assert _convert.audit_event(_convert.audit_event_to_proto(event)) == event
    doc = PolicyDocument("rules: []\n", 4, "ab" * 32, NOW, "admin")
    assert _convert.policy_document(_convert.policy_document_to_proto(doc)) == doc
    decision = PolicyDecision(False, "", "no rule matched", False, 0, (), None, False, ("x",))
    assert _convert.policy_decision(_convert.policy_decision_to_proto(decision)) == decision
    check = ChainVerification(False, 10, 7, "hash mismatch", "ff" * 32)
    assert _convert.chain_verification(_convert.chain_verification_to_proto(check)) == check
    token = JoinToken("secret", NOW)
    assert _convert.join_token(_convert.join_token_to_proto(token)) == token


def test_timestamps_become_aware_utc_datetimes() -> None:
    ts = Timestamp(seconds=1_767_268_800, nanos=123_000_000)
    value = _convert.time_or_none(ts)
    assert value == datetime(2026, 1, 1, 12, 0, 0, 123_000, tzinfo=UTC)
    assert value is not None
    assert value.utcoffset() == timedelta(0)


def test_unset_and_zero_timestamps_read_as_none() -> None:
    assert _convert.time_or_none(Timestamp()) is None
    assert _convert.time_or_none(Timestamp(seconds=0, nanos=0)) is None
    assert _convert.time_or_none(Timestamp(seconds=1)) is not None


def test_other_timezones_are_converted_to_utc_on_the_wire() -> None:
    plus_two = datetime(2026, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    wire = _convert.time_to_proto(plus_two)
    assert wire is not None
    assert _convert.time_or_none(wire) == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        _convert.time_to_proto(datetime(2026, 1, 1, 12, 0))


def test_durations_become_timedeltas() -> None:
    assert _convert.duration(Duration(seconds=900)) == timedelta(minutes=15)
    assert _convert.duration_or_none(Duration()) is None
    wire = _convert.duration_to_proto(timedelta(milliseconds=1500))
    assert wire is not None
    assert (wire.seconds, wire.nanos) == (1, 500_000_000)
    assert _convert.duration_to_proto(None) is None


@pytest.mark.parametrize("state", list(RequestState))
def test_request_states_map_by_name(state: RequestState) -> None:
    wire = _convert.request_state_to_proto(state)
    assert types_pb2.RequestState.Name(wire) == f"REQUEST_STATE_{state.value}"
    assert _convert.request_state(wire) is state


@pytest.mark.parametrize("state", list(GrantState))
def test_grant_states_map_by_name(state: GrantState) -> None:
    wire = _convert.grant_state_to_proto(state)
    assert types_pb2.GrantState.Name(wire) == f"GRANT_STATE_{state.value}"
    assert _convert.grant_state(wire) is state


def test_unspecified_grant_state_of_a_request_is_none_but_a_grant_needs_one() -> None:
    assert _convert.grant_state_or_none(types_pb2.GRANT_STATE_UNSPECIFIED) is None
    with pytest.raises(InternalError, match="without a state"):
        _convert.grant_state(types_pb2.GRANT_STATE_UNSPECIFIED)


def test_unspecified_request_state_is_a_coordinator_bug() -> None:
    wire = _convert.request_to_proto(make_request())
    wire.state = types_pb2.REQUEST_STATE_UNSPECIFIED
    with pytest.raises(InternalError, match="without a state"):
        _convert.request(wire)


def test_unknown_enum_numbers_say_the_client_may_be_older() -> None:
    wire = _convert.grant_to_proto(make_grant())
    wire.state = 99  # type: ignore[assignment]
    with pytest.raises(InternalError, match="older than the coordinator"):
        _convert.grant(wire)


def test_missing_required_time_is_reported_not_invented() -> None:
    wire = _convert.grant_to_proto(make_grant())
    wire.ClearField("not_after")
    with pytest.raises(InternalError, match="grant without a time"):
        _convert.grant(wire)


def test_offline_policy_and_review_decisions() -> None:
    policy = OfflinePolicy(OfflineMode.REVOKE_AFTER, timedelta(minutes=5))
    assert _convert.offline_policy(_convert.offline_policy_to_proto(policy)) == policy
    # An older coordinator that sends no mode means the documented default.
    assert _convert.offline_policy(types_pb2.OfflinePolicy()).mode is OfflineMode.HOLD
    review = Review("bob", ReviewDecision.DENY, "not now", NOW)
    assert _convert.review(_convert.review_to_proto(review)) == review
    with pytest.raises(InternalError, match="without a decision"):
        _convert.review(types_pb2.Review(reviewer="bob", reviewed_at=_convert.time_to_proto(NOW)))


def test_request_and_grant_round_trip_the_workflow_fields() -> None:
    from dataclasses import replace

    from jitmesh.types import ApprovalPlan, ApprovalStage, StageMode

    plan = ApprovalPlan(
        policy_version=7,
        rule="prod",
        stages=(
            ApprovalStage(
                "team", 2, StageMode.ANY, ("sre",), ("carol",), timedelta(minutes=5), ("oncall",)
            ),
            ApprovalStage("owners", 1, StageMode.ALL, ("dba", "security")),
        ),
        pending_ttl=timedelta(minutes=30),
        reason_required=True,
        ticket_pattern="^INC-[0-9]+$",
        automatic=False,
    )
    original = replace(
        make_request(),
        state=RequestState.SCHEDULED,
        plan=plan,
        ticket="INC-1",
        current_stage=1,
        start_at=NOW + timedelta(hours=2),
        selector={"env": "staging"},
        grant_ids=("grt-" + "1" * 32, "grt-" + "2" * 32),
        reused=True,
        extends_grant_id="grt-" + "3" * 32,
        change_seq=42,
        reviews=(Review("bob", ReviewDecision.APPROVE, "ok", NOW, stage=1),),
    )
    assert _convert.request(_convert.request_to_proto(original)) == original
    grant = replace(make_grant(), extensions=2, original_not_after=NOW, breakglass_code_id="bgc-1")
    assert _convert.grant(_convert.grant_to_proto(grant)) == grant
