"""Value types of the public SDK. Plain frozen dataclasses: never protobuf objects."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple


class RequestState(enum.StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    DENIED = "DENIED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    # Approved with a scheduled start still ahead: the grant is issued at `start_at`, after
    # eligibility and locks are checked again.
    SCHEDULED = "SCHEDULED"

    @property
    def terminal(self) -> bool:
        return self not in (RequestState.PENDING, RequestState.SCHEDULED)


class GrantState(enum.StrEnum):
    PENDING_DELIVERY = "PENDING_DELIVERY"
    ACTIVE = "ACTIVE"
    REVOKING = "REVOKING"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    RELEASED = "RELEASED"
    FAILED = "FAILED"
    REVOKE_FAILED = "REVOKE_FAILED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_GRANT_STATES


_TERMINAL_GRANT_STATES = frozenset(
    {GrantState.REVOKED, GrantState.EXPIRED, GrantState.RELEASED, GrantState.FAILED}
)


class ReviewDecision(enum.StrEnum):
    APPROVE = "APPROVE"
    DENY = "DENY"


class OfflineMode(enum.StrEnum):
    HOLD = "HOLD"
    REVOKE_AFTER = "REVOKE_AFTER"


@dataclass(frozen=True, slots=True)
class OfflinePolicy:
    """What the agent does with a grant while it cannot reach the coordinator."""

    mode: OfflineMode = OfflineMode.HOLD
    grace: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class Review:
    reviewer: str
    decision: ReviewDecision
    reason: str
    reviewed_at: datetime
    # The groups named by the request's approval plan that the reviewer was in at the moment
    # of reviewing (membership is judged then, not later). Kept by the coordinator, not sent.
    groups: tuple[str, ...] = ()
    # The stage (0-based) this review counted for.
    stage: int = 0
    # The delegate that relayed this review for `reviewer` (a notification bridge's token with
    # scope review-on-behalf, or "slack"); empty when the reviewer acted in person.
    via: str = ""


class StageMode(enum.StrEnum):
    """`any`: N distinct people from the union of the stage's groups and users. `all`: at
    least one from each listed group, and N in total."""

    ANY = "any"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class ApprovalStage:
    """One stage of an approval plan: who may approve it (group and user names, never a
    member list) and how many must."""

    name: str
    approvals: int = 1
    mode: StageMode = StageMode.ANY
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    # After `timeout` without passing, members of `escalation_groups` may approve it too.
    timeout: timedelta | None = None
    escalation_groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ApprovalPlan:
    """What a request needs to be approved, pinned when it was created: the policy version and
    rule that matched and the stages, run in order. A later policy never changes it."""

    policy_version: int
    rule: str
    stages: tuple[ApprovalStage, ...]
    # When people may approve (window texts such as "weekdays 08:00-20:00 Europe/Berlin");
    # empty means at any time.
    approve_windows: tuple[str, ...] = ()
    # How long a request may stay pending; whether it needs a reason; the pattern its ticket
    # id must match ('' when none is required).
    pending_ttl: timedelta | None = None
    reason_required: bool = False
    ticket_pattern: str = ""
    # True when the plan approved at once (no stage was needed).
    automatic: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    subject: str
    agent: str
    action: str
    duration: timedelta
    reason: str
    state: RequestState
    rule: str
    approvals_required: int
    approver_groups: tuple[str, ...]
    reviews: tuple[Review, ...]
    created_at: datetime
    pending_expires_at: datetime | None
    decided_at: datetime | None
    decided_by: str
    decision_reason: str
    grant_id: str
    grant_state: GrantState | None
    plan: ApprovalPlan | None = None
    ticket: str = ""
    # The stage waiting for approvals (meaningful while PENDING).
    current_stage: int = 0
    # A scheduled start: the grant's window begins here (None: at approval).
    start_at: datetime | None = None
    # Several hosts: the label selector (`agent` is then empty) and, once approved, one grant
    # per matching agent (`grant_id` is the first).
    selector: dict[str, str] = field(default_factory=dict)
    grant_ids: tuple[str, ...] = ()
    # Answered with a live grant the subject already held (`grant_id`): nothing new was made.
    reused: bool = False
    # For an extension request: the grant it extends.
    extends_grant_id: str = ""
    # A resume cursor for WatchRequests: the number of this request's latest change.
    change_seq: int = 0
    # The request's page on jitmesh-web ("" when the coordinator does not know its address).
    link: str = ""

    @property
    def stages(self) -> tuple[ApprovalStage, ...]:
        return self.plan.stages if self.plan is not None else ()


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    request_id: str
    agent: str
    subject: str
    action: str
    not_before: datetime
    not_after: datetime
    state: GrantState
    offline: OfflinePolicy
    created_at: datetime
    ended_at: datetime | None = None
    ended_by: str = ""
    end_reason: str = ""
    grant_seq: int = 0
    revoke_seq: int = 0
    applied_at: datetime | None = None
    failure: str = ""
    epoch: int = 0
    # How many times the grant was extended in place, and the end it was first given.
    extensions: int = 0
    original_not_after: datetime | None = None
    # Set for a grant adopted from a break-glass code used on the host.
    breakglass_code_id: str = ""

    @property
    def expires_at(self) -> datetime:
        return self.not_after


@dataclass(frozen=True, slots=True)
class RequestOption:
    """Something the caller may ask for: an agent and action, the longest duration, and the
    approval a request would get now (`plan.automatic`, or its stages)."""

    agent: str
    labels: dict[str, str]
    action: str
    max_duration: timedelta
    plan: ApprovalPlan
    # Automatic approvals and granted time left in the rule's rolling budget (None: no budget).
    automatic_left: int | None = None
    granted_time_left: timedelta | None = None
    # A live grant the caller already holds for it (a request would reuse it).
    live_grant_id: str = ""


class Created(NamedTuple):
    """What `Client.create_request` returns: the request and, when it was approved at once (or
    a live grant was reused: `request.reused`), its grant. Unpacks as `request, grant`."""

    request: Request
    grant: Grant | None

    @property
    def reused(self) -> bool:
        return self.request.reused


class Extended(NamedTuple):
    """What `Client.extend_grant` returns: the grant (with its new end, or as it was while an
    extension `request` waits for approval)."""

    grant: Grant
    request: Request | None


class Reviewed(NamedTuple):
    """What `Client.approve` returns: the request and, when this approval completed it, the
    new grant. Unpacks as `request, grant`."""

    request: Request
    grant: Grant | None


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    labels: dict[str, str]
    connected: bool
    last_seen_at: datetime | None
    enrolled_at: datetime | None
    version: str = ""
    last_acked_seq: int = 0
    last_seq: int = 0
    active_grants: int = 0
    # The coordinator replica holding the agent's stream ('' when none does).
    replica: str = ""
    # How the answering coordinator serves this agent's version (docs/wire.md, "Mixed
    # versions"): "supported" (its own minor version), "compat" (one minor older, served the
    # older wire), "refused" (to upgrade before it can connect); "" while no version is known.
    compatibility: str = ""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """An operator bearer token as listed: never the token itself. `id` is a prefix of its
    hash, enough to revoke it."""

    id: str
    user: str
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    # What the token may do: empty means everything its user may do; "review-on-behalf" is a
    # notification bridge's delegated credential (it may only review as a user it signed in).
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JoinToken:
    token: str = field(repr=False)
    expires_at: datetime
    # Since 0.2: how `agent token list|revoke` names it, and what the agent will get.
    id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    replaces: str = ""


@dataclass(frozen=True, slots=True)
class UserInfo:
    """An operator account. `managed_by` is "local" (groups set by admins with
    `set_user_groups`) or "oidc" (groups from the identity provider at sign-in)."""

    name: str
    groups: tuple[str, ...]
    disabled: bool
    created_at: datetime
    managed_by: str = "local"


@dataclass(frozen=True, slots=True)
class JoinTokenInfo:
    """A join token as listed: never the token itself. `id` is a prefix of its hash, enough to
    revoke it; `uses_left` None is the reusable development token."""

    id: str
    labels: dict[str, str]
    replaces: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    uses_left: int | None
    revoked_at: datetime | None = None
    revoked_by: str = ""
    used_by: tuple[str, ...] = ()

    def live(self, now: datetime) -> bool:
        """Whether it can still enroll an agent at `now`."""
        return (
            self.revoked_at is None
            and (self.expires_at is None or self.expires_at > now)
            and (self.uses_left is None or self.uses_left > 0)
        )


@dataclass(frozen=True, slots=True)
class AuditEvent:
    seq: int
    id: str
    at: datetime
    actor: str
    kind: str
    subject: str
    agent: str
    request_id: str
    grant_id: str
    details: dict[str, str]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    yaml: str
    version: int
    sha256: str
    applied_at: datetime | None
    applied_by: str


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The answer of `policy test`: which rule matched, or why none did."""

    allowed: bool
    rule: str
    explanation: str
    approval_required: bool
    approvals_required: int
    approver_groups: tuple[str, ...]
    max_duration: timedelta | None
    reason_required: bool
    trace: tuple[str, ...]
    # The plan a request would be pinned to, and the policy version tested (0: a document given
    # in the call).
    plan: ApprovalPlan | None = None
    policy_version: int = 0


@dataclass(frozen=True, slots=True)
class ChainVerification:
    ok: bool
    events_checked: int
    first_bad_seq: int
    problem: str
    head_hash: str


@dataclass(frozen=True, slots=True)
class LockTarget:
    """What a lock matches: every non-empty field must match; at least one is set."""

    subject: str = ""
    agent: str = ""
    action: str = ""

    def matches(self, subject: str, agent: str, action: str) -> bool:
        return (
            (not self.subject or self.subject == subject)
            and (not self.agent or self.agent == agent)
            and (not self.action or self.action == action)
        )

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (("subject", self.subject), ("agent", self.agent), ("action", self.action))
            if v
        ]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class BreakglassCode:
    """A single-use break-glass code as the coordinator records it (never the code itself,
    which is shown once when issued): what it allows, and once an agent reported its use, the
    grant it made and who reviewed that."""

    id: str
    agent: str
    subject: str
    action: str
    duration: timedelta
    issued_at: datetime
    issued_by: str
    expires_at: datetime
    reason: str = ""
    used_at: datetime | None = None
    grant_id: str = ""
    used_by: str = ""
    reviewed_at: datetime | None = None
    reviewed_by: str = ""
    review_note: str = ""
    # Since 0.2: set when the code was voided before use (its signing key leaked).
    voided_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Lock:
    """An emergency stop: while in force, the grants it matches are revoked and new requests
    and approvals it matches are refused."""

    id: str
    target: LockTarget
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None = None
    lifted_at: datetime | None = None
    lifted_by: str = ""
    lift_reason: str = ""

    def in_force(self, now: datetime) -> bool:
        return self.lifted_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class NotifyRoute:
    """Which notices go to a receiver: every non-empty filter must match."""

    events: tuple[str, ...] = ()
    agent_labels: dict[str, str] = field(default_factory=dict)
    actions: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    requesters: bool = False


@dataclass(frozen=True, slots=True)
class NotifyReceiver:
    """A notification receiver. Its secret is never returned: `secret_source` says only where
    it comes from ("stored", "file:/path" or "")."""

    name: str
    kind: str  # webhook, slack, email
    target: str
    route: NotifyRoute
    settings: dict[str, str]
    secret_source: str
    created_at: datetime | None
    created_by: str


@dataclass(frozen=True, slots=True)
class NotifyDelivery:
    """One notice for one receiver (`jitctl notify log`)."""

    id: str
    receiver: str
    event_kind: str
    state: str  # PENDING, FAILING, DELIVERED, ABANDONED
    attempts: int
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str
    request_id: str
    grant_id: str


@dataclass(frozen=True, slots=True)
class SignInConfig:
    """What a client needs to start a single sign-on (`jitctl login`)."""

    issuer: str
    client_id: str
    scopes: tuple[str, ...]
    audience: str


@dataclass(frozen=True, slots=True)
class Replica:
    """A coordinator replica that is running: on a PostgreSQL store each one that reported
    itself lately, on SQLite the one coordinator."""

    id: str
    address: str
    version: str
    started_at: datetime | None
    last_seen_at: datetime | None
    # Agents whose stream this replica holds.
    agents_connected: int


@dataclass(frozen=True, slots=True)
class MeshStatus:
    """The mesh at a glance (`jitctl status`; admins)."""

    coordinator_time: datetime | None
    version: str
    replica: str
    epoch: int
    agents_enrolled: int
    agents_connected: int
    # Requests waiting (PENDING, SCHEDULED) by state.
    requests: Mapping[RequestState, int]
    # Grants not ended, and those ended in the last 24 hours, by state.
    grants: Mapping[GrantState, int]
    revokes_unacknowledged: int
    commands_unacknowledged: int
    policy_version: int
    audit_head_seq: int
    locks_in_force: int
    # The replicas running now, the answering one first (since 0.2).
    replicas: tuple[Replica, ...] = ()
