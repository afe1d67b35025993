"""Request and grant lifecycles as data: the tables, and the one function that checks them."""

from __future__ import annotations

import itertools

import pytest

from jitmesh.types import GrantState, RequestState
from server.domain.errors import Conflict
from server.domain.lifecycle import (
    GRANT_TRANSITIONS,
    LIVE_GRANT_STATES,
    REQUEST_TRANSITIONS,
    REVOCABLE_GRANT_STATES,
    check_grant_transition,
    check_request_transition,
)

G = GrantState
R = RequestState

# The allowed steps, written out independently of the module so a change to either is noticed.
EXPECTED_GRANT_STEPS = {
    (G.PENDING_DELIVERY, G.ACTIVE),
    (G.PENDING_DELIVERY, G.FAILED),
    (G.PENDING_DELIVERY, G.REVOKING),
    (G.PENDING_DELIVERY, G.EXPIRED),
    (G.PENDING_DELIVERY, G.REVOKE_FAILED),
    (G.ACTIVE, G.REVOKING),
    (G.ACTIVE, G.EXPIRED),
    (G.ACTIVE, G.REVOKE_FAILED),
    (G.REVOKING, G.REVOKED),
    (G.REVOKING, G.RELEASED),
    (G.REVOKING, G.EXPIRED),
    (G.REVOKING, G.REVOKE_FAILED),
    (G.REVOKE_FAILED, G.REVOKED),
    (G.REVOKE_FAILED, G.RELEASED),
    (G.REVOKE_FAILED, G.EXPIRED),
    (G.REVOKE_FAILED, G.REVOKING),
}
EXPECTED_REQUEST_STEPS = {
    (R.PENDING, s) for s in (R.APPROVED, R.DENIED, R.CANCELLED, R.EXPIRED, R.SCHEDULED)
} | {(R.SCHEDULED, s) for s in (R.APPROVED, R.DENIED, R.CANCELLED)}


def test_every_state_has_a_row() -> None:
    assert set(GRANT_TRANSITIONS) == set(GrantState)
    assert set(REQUEST_TRANSITIONS) == set(RequestState)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(GrantState, GrantState)))
def test_grant_transitions(current: GrantState, target: GrantState) -> None:
    if (current, target) in EXPECTED_GRANT_STEPS:
        check_grant_transition(current, target)
    else:
        with pytest.raises(Conflict, match=f"grant is {current.value}"):
            check_grant_transition(current, target)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(RequestState, RequestState)))
def test_request_transitions(current: RequestState, target: RequestState) -> None:
    if (current, target) in EXPECTED_REQUEST_STEPS:
        check_request_transition(current, target)
    else:
        with pytest.raises(Conflict, match=f"request is {current.value}"):
            check_request_transition(current, target)


def test_no_state_steps_to_itself() -> None:
    assert all(s not in GRANT_TRANSITIONS[s] for s in GrantState)
    assert all(s not in REQUEST_TRANSITIONS[s] for s in RequestState)


def test_terminal_states_are_exactly_those_without_a_way_out() -> None:
    assert {s for s in GrantState if not GRANT_TRANSITIONS[s]} == {
        s for s in GrantState if s.terminal
    }
    assert {s for s in RequestState if not REQUEST_TRANSITIONS[s]} == {
        s for s in RequestState if s.terminal
    }


def test_live_and_revocable_states() -> None:
    # A grant may still be in force on the host exactly while it is not terminal; REVOKE_FAILED
    # is live (never reported as done).
    assert {s for s in GrantState if not s.terminal} == LIVE_GRANT_STATES
    assert G.REVOKE_FAILED in LIVE_GRANT_STATES
    assert REVOCABLE_GRANT_STATES < LIVE_GRANT_STATES
    assert all(G.REVOKING in GRANT_TRANSITIONS[s] for s in REVOCABLE_GRANT_STATES)


def test_deny_after_approve_is_a_conflict() -> None:
    check_request_transition(R.PENDING, R.DENIED)
    with pytest.raises(Conflict, match="request is APPROVED, cannot become DENIED"):
        check_request_transition(R.APPROVED, R.DENIED)
