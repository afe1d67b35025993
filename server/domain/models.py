"""Coordinator records. Requests, grants, agents and audit events reuse the SDK's value types
(`jitmesh.types`), so the coordinator and its clients speak one vocabulary."""

from __future__ import annotations

import enum
import gc
import os
import secrets
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, NewType

from jitmesh.types import BreakglassCode, Grant, Lock

ADMIN_GROUP = "admins"


class Scope(enum.StrEnum):
    """What a scoped bearer token may do (a token without scopes may do what its user may).

    The rpc layer checks them in one place (server/rpc/auth.py): a scoped token is refused by
    every call except the one its scope names."""

    # A notification bridge's (or other relay's) delegated credential: it may only submit a
    # review in the name of a user it authenticated. That user's own groups decide whether the
    # review counts, and the audit log names both ("bob via slack-bridge").
    REVIEW_ON_BEHALF = "review-on-behalf"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an operator (from a bearer token) or an agent (from its credential)."""

    name: str
    groups: frozenset[str] = frozenset()
    kind: str = "user"
    # A delegate relaying this person's own act ("slack"): audited as "bob via slack".
    via: str = ""
    # The scopes of the bearer token that authenticated the caller; empty = unrestricted. A
    # scoped credential is only ever accepted where rpc/auth.py asks for its scope.
    scopes: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and ADMIN_GROUP in self.groups and not self.via

    @property
    def actor(self) -> str:
        """The name the audit log records for this caller's acts."""
        return f"{self.name} via {self.via}" if self.via else self.name


def same_person(a: str, b: str) -> bool:
    """Names that differ only by case, width or compatibility forms are the same person."""
    return _fold(a) == _fold(b)


def user_name(name: str) -> str:
    """The one spelling of a user name the coordinator stores and compares: NFKC, case-folded
    (so "ALICE", "Alice" and its full-width form are all "alice"). Applied wherever a user
    name enters (tokens, certificates, policy, filters), so one person is one principal."""
    return unicodedata.normalize("NFKC", _fold(name))


def _fold(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold().strip()


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A join token just spent: the labels it gives, the agent it may enroll again (if any),
    and whether it is the reusable development-mode token."""

    labels: dict[str, str]
    replaces: str | None = None
    reusable: bool = False


class CommandKind(enum.StrEnum):
    GRANT = "grant"
    REVOKE = "revoke"
    # A snapshot has its own place in the log (docs/wire.md): its row names no grant, and it is
    # never replayed (a new Hello that needs one gets a new one).
    SNAPSHOT = "snapshot"
    # The grant's end moved later in place (same grant id): sent as the grant with its new
    # not_after, which every agent version applies in place (docs/wire.md, "Extensions are
    # grant commands").
    EXTEND = "extend"
    # A lock kept by the agent, and its lifting (wire 0.2; never for a 0.1 agent): the row's
    # grant_id column holds the lock's id.
    LOCK = "lock"
    UNLOCK = "unlock"


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of an agent's durable command log: about a grant, or (LOCK, UNLOCK) a lock."""

    agent: str
    seq: int
    kind: CommandKind
    grant: Grant | None
    revoke_reason: str = ""
    lock: Lock | None = None

    @property
    def grant_id(self) -> str:
        """The grant the command is about ("" for a lock command)."""
        return "" if self.grant is None else self.grant.id


class AuditKind(enum.StrEnum):
    """Every kind of audit event the coordinator writes itself: one name per event, used by the
    audit log, the metrics (`jitmesh_audit_events_total{kind}`), notices and `jitctl audit list
    --kind`. What an agent reports from its host is stored as `agent.` + the agent's own kind
    (`observed`): agents newer than the coordinator may send kinds it does not know yet."""

    REQUEST_CREATED = "request.created"
    REQUEST_REFUSED = "request.refused"
    REQUEST_APPROVED = "request.approved"
    REQUEST_STAGE_APPROVED = "request.stage_approved"
    REQUEST_REVIEWED = "request.reviewed"
    REQUEST_DENIED = "request.denied"
    REQUEST_CANCELLED = "request.cancelled"
    REQUEST_EXPIRED = "request.expired"
    REQUEST_SCHEDULED = "request.scheduled"
    REQUEST_REUSED = "request.reused"

    GRANT_CREATED = "grant.created"
    GRANT_APPLIED = "grant.applied"
    GRANT_APPLY_FAILED = "grant.apply_failed"
    GRANT_EXTENDED = "grant.extended"
    GRANT_EXTENSION_APPLIED = "grant.extension_applied"
    GRANT_EXTENSION_FAILED = "grant.extension_failed"
    GRANT_EXPIRING = "grant.expiring"
    GRANT_EXPIRED = "grant.expired"
    GRANT_REVOKING = "grant.revoking"
    GRANT_RELEASING = "grant.releasing"
    GRANT_REVOKED = "grant.revoked"
    GRANT_RELEASED = "grant.released"
    GRANT_REVOKE_FAILED = "grant.revoke_failed"

    LOCK_CREATED = "lock.created"
    LOCK_LIFTED = "lock.lifted"
    LOCK_NOT_SENT = "lock.not_sent"
    LOCK_NOT_ACKNOWLEDGED = "lock.not_acknowledged"

    POLICY_APPLIED = "policy.applied"

    USER_CREATED = "user.created"
    USER_DISABLED = "user.disabled"
    USER_ENABLED = "user.enabled"
    USER_GROUPS_CHANGED = "user.groups_changed"
    USER_TOKEN_CREATED = "user.token_created"  # noqa: S105 (an event name, not a secret)
    USER_TOKEN_REGISTERED = "user.token_registered"  # noqa: S105 (an event name, not a secret)
    USER_TOKEN_REVOKED = "user.token_revoked"  # noqa: S105 (an event name, not a secret)
    USER_CERTIFICATE_REVOKED = "user.certificate_revoked"
    USER_SIGNED_IN = "user.signed_in"
    USER_SIGN_IN_REFUSED = "user.sign_in_refused"

    NOTIFY_RECEIVER_ADDED = "notify.receiver_added"
    NOTIFY_RECEIVER_REMOVED = "notify.receiver_removed"

    BREAKGLASS_ISSUED = "breakglass.issued"
    BREAKGLASS_ISSUE_REFUSED = "breakglass.issue_refused"
    BREAKGLASS_REVIEWED = "breakglass.reviewed"
    BREAKGLASS_REFUSED = "breakglass.refused"
    BREAKGLASS_USED = "breakglass.used"
    BREAKGLASS_VOIDED = "breakglass.voided"

    AGENT_JOIN_TOKEN_CREATED = "agent.join_token_created"  # noqa: S105 (an event name, not a secret)
    AGENT_JOIN_TOKEN_REVOKED = "agent.join_token_revoked"  # noqa: S105 (an event name, not a secret)
    AGENT_ENROLLED = "agent.enrolled"
    AGENT_REENROLLED = "agent.reenrolled"
    AGENT_REPLACED = "agent.replaced"
    AGENT_REMOVED = "agent.removed"
    AGENT_ENROLL_REFUSED = "agent.enroll_refused"
    AGENT_CERTIFICATE_RENEWED = "agent.certificate_renewed"
    AGENT_CONNECTED = "agent.connected"
    AGENT_DISCONNECTED = "agent.disconnected"
    AGENT_VERSION_REFUSED = "agent.version_refused"
    AGENT_MESSAGE_REFUSED = "agent.message_refused"
    AGENT_IMPERSONATION_REFUSED = "agent.impersonation_refused"
    AGENT_EVENTS_MISSING = "agent.events_missing"
    AGENT_EVENT_COUNTER_RESET = "agent.event_counter_reset"


# An event an agent observed on its host ("agent.grant.expired"): its kind is the agent's.
ObservedKind = NewType("ObservedKind", str)


def observed(kind: str) -> ObservedKind:
    """The audit kind of an event the agent reported: `agent.` + its kind (48 characters at
    most, as stored since the first version)."""
    return ObservedKind(f"agent.{kind[:48]}")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An audit event to be written; the store assigns seq and the hash chain."""

    kind: AuditKind | ObservedKind
    actor: str
    at: datetime
    subject: str = ""
    agent: str = ""
    request_id: str = ""
    grant_id: str = ""
    details: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: new_id("evt"))


@dataclass(frozen=True, slots=True)
class GrantChange:
    """Columns a grant's compare-and-set step writes besides its state; None leaves one as it is
    (no step ever clears one)."""

    ended_at: datetime | None = None
    ended_by: str | None = None
    end_reason: str | None = None
    applied_at: datetime | None = None
    failure: str | None = None
    epoch: int | None = None


NO_CHANGE = GrantChange()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The audit chain's head (seq, hash) at an instant, signed by a command-signing key."""

    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: bytes


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """A coordinator replica as the shared store knows it (it updates `last_seen_at` while it
    runs)."""

    id: str
    address: str
    version: str
    started_at: datetime
    last_seen_at: datetime


class Truncated(NamedTuple):
    """What one command-log retention step did: agents whose log_start moved, commands deleted."""

    agents: int
    commands: int


class Moved(NamedTuple):
    """A row that a batched compare-and-set moved (the expiry sweep's), with what its audit event
    names. `was`: the state it left. Requests have no `request_id` of their own and leave it
    empty; `id` is then the request's. A named tuple: a sweep makes one per grant, and a frozen
    dataclass costs several times more to build."""

    id: str
    request_id: str
    agent: str
    subject: str
    action: str
    was: str


@dataclass(frozen=True, slots=True)
class BreakglassUse:
    """A break-glass code an agent reports having used (Hello.breakglass, or the typed detail
    of its breakglass.used event): the lease it granted itself."""

    code_id: str
    # The serialized BreakglassCode as presented on the host (verified again here).
    code: bytes
    grant_id: str
    subject: str
    action: str
    used_at: datetime
    not_after: datetime
    # The local user who presented it.
    caller: str


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """A break-glass code as stored when issued: its terms, the SHA-256 (hex) of its text (the
    text itself is never stored) and the command-signing key that signed it."""

    code: BreakglassCode
    code_hash: str
    key_id: str


@dataclass(frozen=True, slots=True)
class LiveCodes:
    """The break-glass codes of one agent signed by one key that are still usable (not used,
    not expired): while there are any, their agent must keep trusting that key for codes."""

    agent: str
    # "" for codes issued before the signing key was recorded (migration 0008): see
    # `breakglass.key_ends`.
    key_id: str
    first_issued_at: datetime
    last_issued_at: datetime
    last_expires_at: datetime


@dataclass(frozen=True, slots=True)
class AgentHello:
    name: str
    labels: dict[str, str]
    last_applied_seq: int
    active_grant_ids: tuple[str, ...]
    version: str
    epoch: int
    boot_id: str
    agent_time: datetime | None
    # Ended on the agent, removal from the host still being retried (since wire 0.2).
    removing_grant_ids: tuple[str, ...] = ()
    # Break-glass leases to adopt before anything else (since wire 0.2).
    breakglass: tuple[BreakglassUse, ...] = ()


class AckStatus(enum.StrEnum):
    """What an agent says it did with a command (docs/wire.md, "Acks")."""

    APPLIED = "APPLIED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    # Already applied and acknowledged before: records nothing new, audits nothing.
    DUPLICATE = "DUPLICATE"
    # At or below the agent's last applied seq but not applied (a snapshot replaced it).
    NOT_APPLIED = "NOT_APPLIED"

    @property
    def settles_nothing(self) -> bool:
        return self in (AckStatus.DUPLICATE, AckStatus.NOT_APPLIED)


@dataclass(frozen=True, slots=True)
class GrantResult:
    """One grant's (or tombstone's) outcome in a snapshot's ack."""

    grant_id: str
    status: AckStatus
    reason: str = ""
    applied_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AgentAck:
    seq: int
    status: AckStatus
    reason: str
    grant_id: str
    results: tuple[GrantResult, ...] = ()
    # "hello" for an ack the coordinator derived from a Hello (the agent's own ack was lost).
    source: str = ""


@dataclass(frozen=True, slots=True)
class AgentObservation:
    """An audit event reported by an agent, with the agent's own id."""

    event_id: str
    kind: str
    grant_id: str
    subject: str
    action: str
    # None when the agent did not say (the coordinator's receiving time is recorded instead).
    observed_at: datetime | None
    details: dict[str, str]
    # The agent's event counter (0: an agent that does not number its events).
    counter: int = 0
    # Kind breakglass.used: the use, to adopt.
    breakglass: BreakglassUse | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """What an agent gets after its Hello: where its log resumes, and what follows."""

    resume_after_seq: int
    commands: tuple[Command, ...]
    snapshot: tuple[Grant, ...] | None
    snapshot_seq: int
    tombstones: tuple[str, ...] = ()
    # With a snapshot: the locks in force that concern the agent (it keeps exactly these).
    locks: tuple[Lock, ...] = ()


def new_id(prefix: str) -> str:
    """`prefix-` and 32 hex digits: 48 bits of wall-clock milliseconds, then 80 random bits.

    Ids sort by creation time (as UUIDv7 does), so the primary-key and audit-id indexes grow at
    their right edge instead of touching a random page per insert; the random part keeps them
    unique. The time is only for locality, never read back, so it comes from the system and not
    from the injected clock."""
    if not _random_pool:
        blob = os.urandom(10 * _POOL).hex()
        _random_pool.extend(blob[i : i + 20] for i in range(0, len(blob), 20))
    return f"{prefix}-{time.time_ns() // 1_000_000 & 0xFFFFFFFFFFFF:012x}{_random_pool.pop()}"


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block: for synchronous code that builds a big
    batch of acyclic values (a sweep's audit entries and events, 100,000 at once). While such a
    batch grows, the collections its allocations trigger traverse it again and again, and its
    survivors set off full collections of the whole heap (a fifth of a 100,000-grant sweep's
    Python time, docs/performance.md). Reference counting still frees everything at once;
    only cycles made inside wait for the next collection. Never around an await."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def new_ids(prefix: str, n: int) -> list[str]:
    """`n` ids as `new_id` makes them, for a batch (an expiry sweep makes one per grant): one
    clock read and one `os.urandom` call for all of them."""
    if n <= 0:
        return []
    head = f"{prefix}-{time.time_ns() // 1_000_000 & 0xFFFFFFFFFFFF:012x}"
    blob = os.urandom(10 * n).hex()
    return [head + blob[i : i + 20] for i in range(0, 20 * n, 20)]


# Random parts are drawn from the OS in blocks (one os.urandom call per _POOL ids: an expiry
# sweep makes one id per grant). A forked child must not reuse its parent's.
_POOL = 512
_random_pool: list[str] = []
os.register_at_fork(after_in_child=_random_pool.clear)


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """What the store counts for `jitctl status` and the metrics: one read, no lists."""

    agents_enrolled: int
    # Requests waiting for a decision (or a scheduled start), by state name.
    requests: dict[str, int]
    # Grants not ended, and those ended since the time asked for, by state name.
    grants: dict[str, int]
    # Grants whose revoke was sent and not yet acknowledged (REVOKING).
    revokes_unacknowledged: int
    # Commands of any kind not yet acknowledged: sum over agents of last_seq - last_acked_seq.
    commands_unacknowledged: int
    locks_in_force: int
    policy_version: int
    # Agents whose stream each replica holds, as the store records it (replica id -> count).
    connected_by_replica: dict[str, int] = field(default_factory=dict)
