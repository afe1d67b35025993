"""What the domain needs from the outside: the store (one interface, several implementations)
and the link registry that pushes commands to connected agents."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from jitmesh.types import (
    Agent,
    AuditEvent,
    Grant,
    GrantState,
    PolicyDocument,
    Request,
    RequestState,
    Review,
)

from .models import AuditEntry, Command, CommandKind, Principal


class Tx(Protocol):
    """One atomic write transaction. Compare-and-set methods return False on a lost race."""

    new_audit: list[AuditEvent]

    async def get_request(self, request_id: str) -> Request | None: ...
    async def get_grant(self, grant_id: str) -> Grant | None: ...
    async def get_agent(self, name: str) -> Agent | None: ...
    async def insert_request(self, r: Request) -> None: ...
    async def decide_request(
        self,
        request_id: str,
        *,
        expected: RequestState,
        state: RequestState,
        at: datetime,
        by: str,
        reason: str,
        grant_id: str = "",
    ) -> bool: ...
    async def insert_review(self, request_id: str, review: Review) -> bool: ...
    async def insert_grant(self, g: Grant) -> None: ...
    async def move_grant(
        self, grant_id: str, *, expected: Iterable[GrantState], state: GrantState, **fields: Any
    ) -> bool: ...
    async def move_grants(
        self,
        grant_ids: Sequence[str],
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        **fields: Any,
    ) -> set[str]: ...
    async def append_command(
        self, agent: str, kind: CommandKind, grant_id: str, at: datetime, revoke_reason: str = ""
    ) -> int: ...
    async def ack_command(
        self, agent: str, seq: int, status: str, reason: str, at: datetime
    ) -> tuple[CommandKind, str, datetime] | None: ...
    async def enroll_agent(
        self, name: str, labels: dict[str, str], credential_hash: str, at: datetime
    ) -> bool: ...
    async def agent_seen(
        self,
        name: str,
        at: datetime,
        *,
        labels: dict[str, str] | None = None,
        version: str | None = None,
        boot_id: str | None = None,
    ) -> None: ...
    async def remove_agent(self, name: str, at: datetime) -> bool: ...
    async def insert_join_token(
        self,
        token_hash: str,
        labels: dict[str, str],
        by: str,
        at: datetime,
        expires_at: datetime | None,
        max_uses: int | None,
    ) -> None: ...
    async def use_join_token(self, token_hash: str, at: datetime) -> dict[str, str] | None: ...
    async def upsert_user(self, name: str, groups: Iterable[str], at: datetime) -> None: ...
    async def insert_token(
        self, token_hash: str, user: str, at: datetime, expires_at: datetime | None, label: str
    ) -> bool: ...
    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def audit(self, entry: AuditEntry) -> AuditEvent | None: ...
    async def audit_many(self, entries: Sequence[AuditEntry]) -> list[AuditEvent]: ...
    async def due_grants(self, now: datetime, limit: int) -> list[Grant]: ...
    async def due_requests(self, now: datetime, limit: int) -> list[str]: ...


class Store(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Tx]: ...
    async def close(self) -> None: ...
    async def get_request(self, request_id: str) -> Request | None: ...
    async def list_requests(
        self,
        *,
        states: Sequence[RequestState],
        subject: str,
        agent: str,
        limit: int,
        page_token: str,
    ) -> tuple[list[Request], str]: ...
    async def get_grant(self, grant_id: str) -> Grant | None: ...
    async def list_grants(
        self,
        *,
        states: Sequence[GrantState],
        subject: str,
        agent: str,
        limit: int,
        page_token: str,
    ) -> tuple[list[Grant], str]: ...
    async def live_grants(self, agent: str) -> list[Grant]: ...
    async def get_agent(self, name: str) -> Agent | None: ...
    async def list_agents(self) -> list[Agent]: ...
    async def agent_for_credential(self, credential_hash: str) -> str | None: ...
    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None: ...
    async def user_groups(self, name: str) -> frozenset[str] | None: ...
    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]: ...
    async def first_unacked_seq(self, agent: str) -> int | None: ...
    async def current_policy(self) -> PolicyDocument | None: ...
    async def list_audit(
        self,
        *,
        since: datetime | None,
        agent: str,
        subject: str,
        kind: str,
        grant_id: str,
        request_id: str,
        after_seq: int,
        limit: int,
    ) -> list[AuditEvent]: ...
    async def audit_chain(self, after_seq: int, limit: int) -> list[AuditEvent]: ...
    async def next_deadline(self) -> datetime | None: ...
    async def get_meta(self, key: str) -> str | None: ...


class CommandSink(Protocol):
    """Pushes freshly committed commands to the agent's open stream, if it has one. A hint only:
    an agent that misses it catches up from the command log when it reconnects."""

    def push(self, commands: Sequence[Command]) -> None: ...

    def connected(self, agent: str) -> bool: ...

    def disconnect(self, agent: str, reason: str) -> None: ...
