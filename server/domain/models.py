"""Coordinator records. Requests, grants, agents and audit events reuse the SDK's value types
(`jitmesh.types`), so the coordinator and its clients speak one vocabulary."""

from __future__ import annotations

import enum
import secrets
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from jitmesh.types import Grant

ADMIN_GROUP = "admins"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an operator (from a bearer token) or an agent (from its credential)."""

    name: str
    groups: frozenset[str] = frozenset()
    kind: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and ADMIN_GROUP in self.groups


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


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of an agent's durable command log."""

    agent: str
    seq: int
    kind: CommandKind
    grant: Grant
    revoke_reason: str = ""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An audit event to be written; the store assigns seq and the hash chain."""

    kind: str
    actor: str
    at: datetime
    subject: str = ""
    agent: str = ""
    request_id: str = ""
    grant_id: str = ""
    details: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: new_id("evt"))


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


@dataclass(frozen=True, slots=True)
class AgentAck:
    seq: int
    status: str  # APPLIED, FAILED, REJECTED
    reason: str
    grant_id: str


@dataclass(frozen=True, slots=True)
class AgentObservation:
    """An audit event reported by an agent, with the agent's own id."""

    event_id: str
    kind: str
    grant_id: str
    subject: str
    action: str
    observed_at: datetime
    details: dict[str, str]
    # The agent's event counter (0: an agent that does not number its events).
    counter: int = 0


@dataclass(frozen=True, slots=True)
class Resume:
    """What an agent gets after its Hello: where its log resumes, and what follows."""

    resume_after_seq: int
    commands: tuple[Command, ...]
    snapshot: tuple[Grant, ...] | None
    snapshot_seq: int
    tombstones: tuple[str, ...] = ()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"
