"""What the domain needs from the outside: the store (one interface, several implementations,
one contract suite in tests/store/) and the link registry that pushes commands to connected
agents.

The store's contract, whatever the implementation:
- A write runs as a function given a `Tx` (`Store.write`): the store may run it again, from the
  start, on a serialization failure or deadlock between replicas, so the function's only
  effects are through the `Tx` and its result (publish, push and notify after it returned).
- Every read inside a write goes through the `Tx` (never through the `Store`, which may be
  another connection that does not see the transaction's own writes, or waits for them).
- Compare-and-set methods return False (or leave an id out) on a lost race; the caller decides.
- Shared state lives in the store, not in a process: the audit chain's head, checkpoints,
  meta (epoch and generations), policy versions, locks, tokens and users.

Adding a store method or a column: declare it here (typed: no `**fields`), implement it in
both stores (server/store/sqlite.py and server/store/postgres/; rows are read by column name
through server/store/rows.py), add a migration to both migration folders
(tests/store/test_schema.py fails while their tables or columns differ), and test it in the
contract suite (tests/store/), which runs every test on both stores.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypeVar

from jitmesh.types import (
    Agent,
    AuditEvent,
    BreakglassCode,
    Grant,
    GrantState,
    JoinTokenInfo,
    Lock,
    LockTarget,
    PolicyDocument,
    Request,
    RequestState,
    Review,
    TokenInfo,
    UserInfo,
)

from .models import (
    NO_CHANGE,
    AuditEntry,
    Checkpoint,
    Command,
    CommandKind,
    GrantChange,
    IssuedCode,
    JoinToken,
    LiveCodes,
    Moved,
    Principal,
    ReplicaInfo,
    StatusCounts,
    Truncated,
)

T = TypeVar("T")

if TYPE_CHECKING:
    from .receivers import ReceiverSpec


class Tx(Protocol):
    """One atomic write transaction. Compare-and-set methods return False on a lost race."""

    new_audit: list[AuditEvent]

    async def get_request(self, request_id: str) -> Request | None: ...
    async def get_grant(self, grant_id: str) -> Grant | None: ...
    async def get_agent(self, name: str) -> Agent | None: ...
    async def agents_and_locks(
        self, names: Sequence[str], now: datetime
    ) -> tuple[dict[str, Agent], list[Lock]]:
        """As `Store.agents_and_locks`, in this transaction."""
        ...

    async def live_grants(self, agent: str) -> list[Grant]: ...
    async def agent_for_credential(self, credential_hash: str) -> str | None: ...
    async def user_groups(self, name: str) -> frozenset[str] | None: ...
    async def get_meta(self, key: str) -> str | None: ...
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
    async def insert_requests(self, requests: Sequence[Request]) -> None: ...
    async def insert_grants(self, grants: Sequence[Grant]) -> None: ...
    async def append_commands(
        self, commands: Sequence[tuple[str, CommandKind, str, datetime]]
    ) -> list[int | None]: ...
    async def insert_review(self, request_id: str, review: Review) -> bool: ...
    async def insert_grant(self, g: Grant) -> None: ...
    async def move_grant(
        self,
        grant_id: str,
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        change: GrantChange = NO_CHANGE,
    ) -> bool: ...
    async def move_grants(
        self,
        grant_ids: Sequence[str],
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        change: GrantChange = NO_CHANGE,
    ) -> set[str]: ...
    async def append_command(
        self, agent: str, kind: CommandKind, grant_id: str, at: datetime, revoke_reason: str = ""
    ) -> int: ...
    async def ack_commands(
        self, acks: Sequence[tuple[str, int, str, str]], at: datetime
    ) -> dict[tuple[str, int], tuple[CommandKind, str, datetime]]: ...
    async def unacked_lock_commands(self, agent: str) -> list[Command]:
        """The agent's LOCK and UNLOCK commands not acknowledged yet, in seq order."""
        ...

    async def supersede_commands(self, agent: str, snapshot_seq: int, at: datetime) -> int: ...
    async def settle_unsent(
        self, agent: str, seqs: Sequence[int], at: datetime, reason: str
    ) -> list[int]: ...
    async def agents_after(self, after: str, limit: int) -> list[tuple[str, str]]: ...
    async def lock_handout(self, lock_id: str) -> str | None: ...
    async def hold_lock(self, lock_id: str) -> Lock | None:
        """The lock, its row held until commit (PostgreSQL: `FOR UPDATE`; SQLite: the one
        writer holds everything): a lift and a handout step of the same lock take turns."""
        ...

    async def set_lock_handout(self, lock_id: str, after: str | None) -> None: ...
    async def truncate_command_log(self, limit: int) -> Truncated:
        """One step of retention (domain/retention.py): move at most `limit` agents'
        `command_log_start` up to their acknowledged prefix, then delete at most `limit` of the
        commands at or below it; how many of each."""
        ...

    async def get_grants(self, grant_ids: Sequence[str]) -> dict[str, Grant]: ...
    async def enroll_agent(
        self,
        name: str,
        labels: dict[str, str],
        credential_hash: str,
        at: datetime,
        join_token_id: str = "",
    ) -> bool: ...
    async def agent_seen(
        self,
        name: str,
        at: datetime,
        *,
        labels: dict[str, str] | None = None,
        version: str | None = None,
        boot_id: str | None = None,
        replica: str | None = None,
    ) -> None: ...
    async def agent_left(self, name: str, replica: str, at: datetime) -> None: ...
    async def remove_agent(self, name: str, at: datetime) -> bool: ...
    async def insert_join_token(
        self,
        token_hash: str,
        labels: dict[str, str],
        by: str,
        at: datetime,
        expires_at: datetime | None,
        max_uses: int | None,
        replaces: str | None = None,
    ) -> None: ...
    async def use_join_token(self, token_hash: str, at: datetime) -> JoinToken | None: ...
    async def revoke_join_token(self, token_id: str, at: datetime, by: str) -> bool: ...
    async def upsert_user(self, name: str, groups: Iterable[str], at: datetime) -> None: ...
    async def insert_token(
        self,
        token_hash: str,
        user: str,
        at: datetime,
        expires_at: datetime | None,
        label: str,
        scopes: Iterable[str] = (),
    ) -> bool: ...
    async def revoke_token(self, token_id: str, at: datetime) -> bool: ...
    async def set_user_disabled(self, name: str, disabled: bool) -> bool: ...
    async def revoke_certificate(self, serial: str, at: datetime, by: str, reason: str) -> bool: ...
    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def audit(self, entry: AuditEntry) -> AuditEvent | None: ...
    async def audit_many(
        self, entries: Sequence[AuditEntry], *, fresh: bool = False
    ) -> list[AuditEvent]: ...
    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, change: GrantChange = NO_CHANGE
    ) -> list[Moved]: ...
    async def move_due_requests(
        self, now: datetime, limit: int, *, state: RequestState, by: str, reason: str
    ) -> list[Moved]: ...
    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        """As `Store.recent_auto_grants`, inside the transaction; concurrent transactions
        reading the same (subject, rule) take turns until commit, so a budget checked here and
        the grant written after it are one step (SQLite: one writer at a time; PostgreSQL: a
        transaction-level advisory lock on the pair)."""
        ...

    async def insert_breakglass_codes(self, codes: Sequence[IssuedCode]) -> None:
        """Each code with the SHA-256 (hex) of its text (the text itself is never stored) and
        the key that signed it."""
        ...

    async def get_breakglass_code(self, code_id: str) -> BreakglassCode | None: ...

    async def void_breakglass_codes(
        self, key_id: str, *, issued_from: datetime, issued_to: datetime, now: datetime
    ) -> list[tuple[str, str, str]]:
        """Void the codes neither used, voided nor expired at `now` that `key_id` signed (or,
        unrecorded, were issued from `issued_from` to `issued_to`, while it was current); each
        voided code's (id, agent, subject)."""
        ...

    async def mark_breakglass_used(
        self, code_id: str, *, used_at: datetime, grant_id: str, used_by: str
    ) -> bool:
        """Compare-and-set: only a code not yet used. False when it was (or is unknown)."""
        ...

    async def review_breakglass(self, code_id: str, *, at: datetime, by: str, note: str) -> bool:
        """Compare-and-set: only a used code not yet reviewed."""
        ...

    async def insert_lock(self, lock: Lock) -> None: ...
    async def lift_lock(self, lock_id: str, at: datetime, by: str, reason: str) -> bool: ...
    async def get_lock(self, lock_id: str) -> Lock | None: ...
    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None: ...
    async def locks_in_force(self, now: datetime) -> list[Lock]: ...
    async def locked_grants(
        self, target: LockTarget, states: Iterable[GrantState]
    ) -> list[Grant]: ...
    async def locked_requests(self, target: LockTarget) -> list[Request]: ...
    async def pending_requests(self) -> list[Request]: ...
    async def set_request_grants(self, request_id: str, grant_ids: Sequence[str]) -> None: ...
    async def list_agents(self) -> list[Agent]: ...
    async def extend_grant(
        self, grant_id: str, *, expected_not_after: datetime, not_after: datetime
    ) -> bool: ...
    async def append_revokes(
        self, grants: Sequence[Grant], at: datetime, revoke_reason: str
    ) -> dict[str, int]: ...
    async def get_user_record(self, name: str) -> tuple[frozenset[str], bool, str] | None:
        """(groups, disabled, managed_by) of a user, or None."""
        ...

    async def insert_oidc_user(self, name: str, groups: Iterable[str], at: datetime) -> None: ...
    async def insert_receiver(self, spec: ReceiverSpec) -> bool: ...
    async def delete_receiver(self, name: str) -> bool: ...


class Store(Protocol):
    async def write(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run `work` in one write transaction and commit; run it again from the start (a new
        `Tx`) when the store reports a serialization failure or deadlock. Returns what `work`
        returned; an exception from `work` rolls back and propagates."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One write transaction as a block, run once (never retried): kept for the callers not
        yet moved to `write`. On a store with several writers a serialization failure surfaces
        as `Conflict` ("try again")."""
        ...

    async def close(self) -> None: ...
    async def audit_head(self) -> tuple[int, str]: ...
    async def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...
    async def checkpoints(self) -> list[Checkpoint]: ...
    async def last_checkpoint(self) -> Checkpoint | None: ...
    async def replica_seen(
        self, replica: str, address: str, version: str, started_at: datetime, at: datetime
    ) -> None: ...
    async def replica_stopped(self, replica: str) -> None: ...
    async def list_replicas(self) -> list[ReplicaInfo]: ...
    async def take_token(
        self, limiter: str, caller: str, rate: float, burst: int, at: datetime
    ) -> int:
        """Take one token from `caller`'s bucket of `limiter` (`burst` at most, refilled at
        `rate` per second from `at`'s clock, never by a clock that went back), shared by every
        replica; returns the calls refused in a row, this one included (0: taken)."""
        ...

    async def forget_full_buckets(self, limiter: str, at: datetime) -> int:
        """Delete `limiter`'s buckets that are full again at `at`; how many."""
        ...

    async def get_secret(self, name: str) -> bytes | None: ...
    async def add_secrets(self, secrets: Sequence[tuple[str, bytes]], at: datetime) -> bool:
        """Store every (name, ciphertext), or none when any name is stored already (another
        replica was first); True when stored."""
        ...

    async def put_secret(
        self, name: str, ciphertext: bytes, at: datetime, *, replace: bool = True
    ) -> bool: ...
    async def status_counts(self, now: datetime, ended_since: datetime) -> StatusCounts: ...
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
    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]: ...
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
    # The agent's grants whose revoke is not acknowledged as done (REVOKING, REVOKE_FAILED).
    async def unremoved_grants(self, agent: str) -> list[Grant]: ...
    async def expiring_grants(self, after: datetime, until: datetime, limit: int) -> list[Grant]:
        """ACTIVE grants ending in (after, until], soonest first."""
        ...

    async def get_agent(self, name: str) -> Agent | None: ...
    async def agents_named(self, names: Sequence[str]) -> dict[str, Agent]:
        """The enrolled agents among `names`, by name (one statement: handshakes that arrive
        together read their agents at once)."""
        ...

    async def agents_and_locks(
        self, names: Sequence[str], now: datetime
    ) -> tuple[dict[str, Agent], list[Lock]]:
        """`agents_named(names)`, and the locks in force at `now` oldest first (as
        `Tx.locks_in_force`), in one trip where the store can: requests that arrive together
        check their agents and locks at once."""
        ...

    async def list_agents(self) -> list[Agent]: ...
    async def agent_for_credential(self, credential_hash: str) -> str | None: ...
    async def agents_for_credentials(self, credential_hashes: Sequence[str]) -> dict[str, str]:
        """The enrolled agents holding these credentials: hash -> agent name (one statement)."""
        ...

    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None: ...
    async def token_holder(self, token_hash: str) -> tuple[Principal, datetime | None] | None:
        """Who an operator token (by its hash) stands for while it is valid, with when it
        expires (None: never); None when it is unknown, revoked or its user disabled."""
        ...

    async def identity_generation(self) -> int:
        """A number that changes (in the changing transaction, whichever process commits it)
        whenever users, operator tokens or revoked certificates change: while it stays the
        same, what a credential stood for still holds. Cheap: called on every operator call."""
        ...

    async def versions(self) -> tuple[int, int]:
        """`identity_generation()` and `policy_version()` in one read (replicas check both
        on their calls; on PostgreSQL each read is a round trip)."""
        ...

    async def token_refusal(self, token_hash: str, now: datetime) -> tuple[str, str]:
        """Why a token `principal_for_token` refused is refused: ("disabled", user),
        ("revoked", user), ("expired", user), or ("unknown", "") for no such token."""
        ...

    async def user_groups(self, name: str) -> frozenset[str] | None: ...
    async def principal_for_user(self, name: str, serial: str) -> Principal | None: ...
    async def list_tokens(self, user: str) -> list[TokenInfo]: ...
    async def list_join_tokens(self) -> list[JoinTokenInfo]: ...
    async def get_user(self, name: str) -> UserInfo | None: ...
    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]: ...
    async def unacked_lock_commands(self, agent: str) -> list[Command]: ...
    async def locks_handing_out(self) -> list[str]: ...
    async def command_log_start(self, agent: str) -> int:
        """The seq at or below which the agent's commands may be gone from the log (0: none):
        an agent resuming below it needs a snapshot."""
        ...

    async def first_unacked_seq(self, agent: str) -> int | None: ...
    async def first_unacked_seqs(self, agents: Sequence[str]) -> dict[str, int]:
        """`first_unacked_seq` of several agents in one statement (those with none left out)."""
        ...

    async def current_policy(self) -> PolicyDocument | None: ...
    async def policy_version(self) -> int: ...
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
    async def due_scheduled(self, now: datetime, limit: int) -> list[Request]: ...
    async def requests_changed_after(self, after_seq: int, limit: int) -> list[tuple[str, int]]: ...
    async def next_deadline(self) -> datetime | None: ...
    async def get_meta(self, key: str) -> str | None: ...
    async def list_locks(self, *, include_ended: bool, now: datetime) -> list[Lock]: ...
    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None: ...
    async def list_breakglass_codes(
        self, *, unreviewed: bool, agent: str, subject: str, include_expired: bool, now: datetime
    ) -> list[BreakglassCode]:
        """Newest first (at most 1000). `unreviewed`: used and not reviewed only; otherwise
        codes unused and past their expiry only with `include_expired`."""
        ...

    async def live_breakglass_codes(self, now: datetime) -> list[LiveCodes]:
        """The codes neither used nor expired at `now`, grouped by agent and signing key."""
        ...


class CommandSink(Protocol):
    """Pushes freshly committed commands to the agent's open stream, if it has one. A hint only:
    an agent that misses it catches up from the command log when it reconnects."""

    def push(self, commands: Sequence[Command]) -> None: ...

    def connected(self, agent: str) -> bool: ...

    def disconnect(self, agent: str, reason: str) -> None: ...
