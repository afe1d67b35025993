"""Request and grant lifecycles as data: the allowed transitions, and one function to check them.

The store enforces each transition with a compare-and-set (`UPDATE ... WHERE state = :from`), so a
deny racing an approval is decided by whichever commits first; a deny arriving for a request that
was approved a moment earlier finds it APPROVED and fails. Denials overwrite nothing once a grant
exists: the grant must be revoked instead.
"""

from __future__ import annotations

from jitmesh.types import GrantState, RequestState

from .errors import Conflict

REQUEST_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.PENDING: frozenset(
        {
            RequestState.APPROVED,
            RequestState.DENIED,
            RequestState.CANCELLED,
            RequestState.EXPIRED,
            RequestState.SCHEDULED,
        }
    ),
    # Approved with a start ahead: at the start the grant is issued (APPROVED) or, when the
    # subject is no longer eligible or is locked, DENIED; the requester may still cancel.
    RequestState.SCHEDULED: frozenset(
        {RequestState.APPROVED, RequestState.DENIED, RequestState.CANCELLED}
    ),
    RequestState.APPROVED: frozenset(),
    RequestState.DENIED: frozenset(),
    RequestState.CANCELLED: frozenset(),
    RequestState.EXPIRED: frozenset(),
}

G = GrantState
GRANT_TRANSITIONS: dict[GrantState, frozenset[GrantState]] = {
    # REVOKE_FAILED straight from a live state: the agent was removed, so no revoke can ever be
    # acknowledged (the host still ends the grant at not_after).
    G.PENDING_DELIVERY: frozenset({G.ACTIVE, G.FAILED, G.REVOKING, G.EXPIRED, G.REVOKE_FAILED}),
    G.ACTIVE: frozenset({G.REVOKING, G.EXPIRED, G.REVOKE_FAILED}),
    # A revoke that meets the expiry ends as EXPIRED; one the agent cannot carry out is kept.
    G.REVOKING: frozenset({G.REVOKED, G.RELEASED, G.EXPIRED, G.REVOKE_FAILED}),
    G.REVOKE_FAILED: frozenset({G.REVOKED, G.RELEASED, G.EXPIRED, G.REVOKING}),
    G.REVOKED: frozenset(),
    G.EXPIRED: frozenset(),
    G.RELEASED: frozenset(),
    G.FAILED: frozenset(),
}

# Each set of grant states is named here once; everything else imports it.
# Grants that may still be in force on the host.
LIVE_GRANT_STATES = frozenset({G.PENDING_DELIVERY, G.ACTIVE, G.REVOKING, G.REVOKE_FAILED})
# Grants a release can still act on (delivered or on their way).
REVOCABLE_GRANT_STATES = frozenset({G.PENDING_DELIVERY, G.ACTIVE})
# Grants a revoke or a lock ends: those the agent may still hold, a failed removal included (a
# REVOKING one is already on its way out).
ENDABLE_GRANT_STATES = frozenset({G.PENDING_DELIVERY, G.ACTIVE, G.REVOKE_FAILED})
# Grants the expiry sweep (and an agent's grant.expired event) moves to EXPIRED at not_after.
DUE_GRANT_STATES = (G.ACTIVE, G.PENDING_DELIVERY, G.REVOKING)
# Grants that can be extended in place, and that a new request for the same agent and action
# reuses instead of asking again.
EXTENDABLE_GRANT_STATES = frozenset({G.PENDING_DELIVERY, G.ACTIVE})


def check_request_transition(current: RequestState, target: RequestState) -> None:
    if target not in REQUEST_TRANSITIONS[current]:
        raise Conflict(f"request is {current.value}, cannot become {target.value}")


def check_grant_transition(current: GrantState, target: GrantState) -> None:
    if target not in GRANT_TRANSITIONS[current]:
        raise Conflict(f"grant is {current.value}, cannot become {target.value}")
