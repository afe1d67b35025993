"""What the SQLite and PostgreSQL stores do the same way, written once.

A store's transaction and its committed-data reads derive from the classes here and give them
two primitives, `_one` and `_all` (a statement's first row or all its rows, each row a mapping
by column name), plus the store's dialect and translated statements (`server/store/queries.py`).
Each store keeps only what its database does differently.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import datetime
from typing import Any, ClassVar

from jitmesh.clock import from_ms, to_ms
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
from server.domain.errors import Conflict
from server.domain.lifecycle import DUE_GRANT_STATES, GRANT_TRANSITIONS, REQUEST_TRANSITIONS
from server.domain.models import (
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
    gc_paused,
)
from server.domain.notices import NOTIFIABLE, Notice, notice_for
from server.domain.receivers import (
    REQUESTER_SUFFIX,
    AttemptRecord,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    ReceiverKind,
    ReceiverSpec,
    as_read,
    split_target,
)
from server.store import rows as rec
from server.store.queries import (
    AGENT_COLUMNS,
    AUDIT_COLUMNS,
    BREAKGLASS_COLUMNS,
    DUE_GRANT_IN,
    GRANT_COLUMNS,
    GRANT_COLUMNS_OF_G,
    LOCK_COLUMNS,
    REQUEST_COLUMNS,
    REQUEST_FROM,
    Dialect,
    Queries,
)

# Grant states that still hold (or may hold) access; counted one by one in the mesh status.
_LIVE = list(rec.LIVE_STATES)


def lock_match(d: Dialect, target: LockTarget, alias: str) -> tuple[str, list[str]]:
    """SQL conditions (each starting with AND) for rows a lock target matches. Lock subjects are
    stored case-folded (subjects are ASCII, so SQL lower() folds them the same way)."""
    where = ""
    args: list[str] = []
    if target.subject:
        where += f" AND lower({alias}subject) = {d.mark}"
        args.append(target.subject)
    if target.agent:
        where += f" AND {alias}agent = {d.mark}"
        args.append(target.agent)
    if target.action:
        where += f" AND {alias}action = {d.mark}"
        args.append(target.action)
    return where, args


def grant_sets(
    d: Dialect, expected: Sequence[GrantState], state: GrantState, change: GrantChange
) -> tuple[str, list[Any]]:
    """The SET clause (and its arguments) of a grant compare-and-set; only lifecycle steps are
    allowed (staying in the same state updates columns only)."""
    for current in expected:
        if state is not current and state not in GRANT_TRANSITIONS[current]:
            raise ValueError(f"grant lifecycle has no step {current.value} -> {state.value}")
    sets = [f"state = {d.mark}"]
    args: list[Any] = [state.value]
    for column, value in rec.grant_change(change):
        sets.append(f"{column} = {d.mark}")
        args.append(value)
    return ", ".join(sets), args


class _Taken(Exception):
    """A secret is stored already: `add_secrets` rolls back what it stored."""


def bucket_args(limiter: str, caller: str, rate: float, burst: int, at: datetime) -> list[Any]:
    """The arguments of `Queries.take_token`: a new bucket starts full less this call's token;
    the rate is kept per millisecond (the unit of `at_ms`)."""
    return [limiter, caller, float(burst - 1), to_ms(at), rate / 1000.0, float(burst)]


def filters(d: Dialect, pairs: list[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    """WHERE conditions for the pairs whose value is set: a list is any of its values."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in pairs:
        if isinstance(value, list):
            if value:
                where.append(d.in_list(column, value))
                args.extend(d.in_args(value))
        elif value:
            where.append(f"{column} = {d.mark}")
            args.append(value)
    return where, args


class SqlReads(ABC):
    """Reads shared by a store's transactions (on the transaction's connection) and by the
    store itself (committed data)."""

    _d: ClassVar[Dialect]
    _q: ClassVar[Queries]

    @abstractmethod
    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The statement's first row, or None."""

    @abstractmethod
    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """All the statement's rows (read at once: no cursor is held across awaits)."""

    def _session(self) -> AbstractAsyncContextManager[SqlReads]:
        """Reads of several statements run on what this gives: one connection. A transaction
        and the SQLite store are that already; the PostgreSQL store lends one pooled connection
        (taking one per statement cost more than the statements, measured)."""
        return nullcontext(self)

    async def _fetch_each(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """All rows of each statement, on one connection; SQLite runs them in one trip to the
        connection's thread (each trip is a hand-off both ways and a turn of the loop)."""
        async with self._session() as db:
            return [await db._all(sql, args) for sql, args in statements]

    async def _reviews(self, ids: list[str]) -> dict[str, tuple[Review, ...]]:
        if not ids:
            return {}
        rows = await self._all(
            f"SELECT {rec.REVIEW_COLUMNS} FROM reviews "
            f"WHERE {self._d.in_list('request_id', ids)} ORDER BY reviewed_at, reviewer",
            self._d.in_args(ids),
        )
        return rec.reviews_by_request(rows)

    async def _requests(self, rows: list[Any]) -> list[Request]:
        """Request rows with their reviews."""
        reviews = await self._reviews([r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def _newest_first(
        self,
        select: str,
        alias: str,
        pairs: list[tuple[str, Any]],
        page_token: str,
        limit: int,
    ) -> tuple[list[Any], bool]:
        """One page of rows, newest first, after the page token; and whether more follow."""
        mark = self._d.mark
        where, args = filters(self._d, pairs)
        after = rec.page(page_token)
        if after:
            where.append(f"({alias}created_at, {alias}id) < ({mark}, {mark})")
            args.extend(after)
        sql = select + (" WHERE " + " AND ".join(where) if where else "")
        order = f" ORDER BY {alias}created_at DESC, {alias}id DESC LIMIT {mark}"
        rows = await self._all(sql + order, [*args, limit + 1])
        return rows[:limit], len(rows) > limit

    async def get_request(self, request_id: str) -> Request | None:
        async with self._session() as db:
            row = await db._one(self._q.get_request, [request_id])
            if row is None:
                return None
            reviews = await db._reviews([request_id])
        return rec.request(row, reviews.get(request_id, ()))

    async def get_grant(self, grant_id: str) -> Grant | None:
        row = await self._one(self._q.get_grant, [grant_id])
        return None if row is None else rec.grant(row)

    async def get_agent(self, name: str) -> Agent | None:
        row = await self._one(self._q.get_agent, [name])
        return None if row is None else rec.agent(row)

    async def agents_named(self, names: Sequence[str]) -> dict[str, Agent]:
        found: dict[str, Agent] = {}
        for sql, args in self._agents_named_sql(names):
            found.update(
                (agent.name, agent) for agent in map(rec.agent, await self._all(sql, args))
            )
        return found

    async def agents_and_locks(
        self, names: Sequence[str], now: datetime
    ) -> tuple[dict[str, Agent], list[Lock]]:
        *agents, locks = await self._fetch_each(
            [*self._agents_named_sql(names), (self._q.locks_in_force, [to_ms(now)])]
        )
        found = {a.name: a for a in map(rec.agent, (row for rows in agents for row in rows))}
        return found, [rec.lock(r) for r in locks]

    def _agents_named_sql(self, names: Sequence[str]) -> list[tuple[str, list[Any]]]:
        return [
            (
                f"SELECT {AGENT_COLUMNS} FROM agents a "
                f"WHERE {self._d.in_list('a.name', part)} AND a.removed_at IS NULL",
                self._d.in_args(part),
            )
            for part in self._d.chunks(names)
        ]

    async def unacked_lock_commands(self, agent: str) -> list[Command]:
        rows = await self._all(self._q.unacked_lock_commands, [agent])
        return [rec.command(r, agent) for r in rows]

    async def agents_after(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Enrolled agents named after `after`, in name order, at most `limit`: (name, version)."""
        rows = await self._all(self._q.agents_after, [after, limit])
        return [(r["name"], r["version"]) for r in rows]

    async def lock_handout(self, lock_id: str) -> str | None:
        """Where the lock's command handout goes on (the last agent handled; "" before the
        first); None when it is done (or there is no such lock)."""
        row = await self._one(self._q.lock_handout, [lock_id])
        return None if row is None else row["handout_after"]

    async def locks_handing_out(self) -> list[str]:
        """The locks whose command handout is not finished, oldest first."""
        return [r["id"] for r in await self._all(self._q.locks_handing_out)]

    async def list_agents(self) -> list[Agent]:
        return [rec.agent(r) for r in await self._all(self._q.list_agents)]

    async def live_grants(self, agent: str) -> list[Grant]:
        return [rec.grant(r) for r in await self._all(self._q.live_grants, [agent])]

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        row = await self._one(self._q.agent_for_credential, [credential_hash])
        return None if row is None else str(row["name"])

    async def agents_for_credentials(self, credential_hashes: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for part in self._d.chunks(credential_hashes):
            rows = await self._all(
                "SELECT name, credential_hash FROM agents "
                f"WHERE {self._d.in_list('credential_hash', part)} AND removed_at IS NULL",
                self._d.in_args(part),
            )
            found.update((str(r["credential_hash"]), str(r["name"])) for r in rows)
        return found

    async def user_groups(self, name: str) -> frozenset[str] | None:
        row = await self._one(self._q.user_groups, [name])
        return None if row is None else frozenset(json.loads(row["groups"]))

    async def get_meta(self, key: str) -> str | None:
        row = await self._one(self._q.get_meta, [key])
        return None if row is None else str(row["value"])

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        row = await self._one(self._q.lock_in_force, [to_ms(now), subject.lower(), agent, action])
        return None if row is None else rec.lock(row)


class SqlTx(SqlReads):
    """One write transaction on one connection: what both stores do the same way. A store adds
    `_run` and `_many`, its audit head, the agents' sequence numbers, and what only its database
    does (`ack_commands`, `move_due_grants`, `move_due_requests`)."""

    new_audit: list[AuditEvent]
    _head: tuple[int, str] | None

    @abstractmethod
    async def _run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""

    @abstractmethod
    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each of `rows` (nothing for none). Nothing is returned, so a
        store may run it later in the transaction, as `_later`."""

    async def _later(self, sql: str, args: Sequence[Any] = ()) -> None:
        """Run a statement whose result nobody needs. A store may run it later in the
        transaction, before its next statement or with its COMMIT (SQLite: in that trip to the
        connection's thread instead of one of its own); an error then surfaces there and fails
        the transaction as any error in it does."""
        await self._run(sql, args)

    @abstractmethod
    async def _audit_head(self) -> tuple[int, str]:
        """The chain's head, read once per transaction, so that no other writer moves it until
        this one commits."""

    @abstractmethod
    async def _advance_seqs(self, wanted: dict[str, int]) -> dict[str, int]:
        """Move each enrolled agent's last_seq up by its number in `wanted`, in one statement;
        returns each moved agent's new last_seq (agents not enrolled are left out)."""

    async def _commands_added(self, agents: Iterable[str]) -> None:
        """Told which agents got commands in this transaction (PostgreSQL wakes the replicas
        holding their streams at commit; one SQLite coordinator needs nothing)."""

    async def _audit_added(self, events: list[AuditEvent]) -> None:
        """Told of the events this transaction appended, after `self._head` moved to the last
        (PostgreSQL moves its head row and tells the other replicas)."""

    async def get_grants(self, grant_ids: Sequence[str]) -> dict[str, Grant]:
        found: dict[str, Grant] = {}
        for chunk in self._d.chunks(grant_ids):
            rows = await self._all(
                f"SELECT {GRANT_COLUMNS} FROM grants WHERE {self._d.in_list('id', chunk)}",
                self._d.in_args(chunk),
            )
            found.update((r["id"], rec.grant(r)) for r in rows)
        return found

    async def get_lock(self, lock_id: str) -> Lock | None:
        row = await self._one(self._q.get_lock, [lock_id])
        return None if row is None else rec.lock(row)

    async def _budget_turn(self, subject: str, rule: str) -> None:
        """Wait until no other transaction is checking the budget of (subject, rule), and keep
        it so until commit (PostgreSQL: an advisory lock). SQLite needs nothing: one writer at
        a time on the file (BEGIN IMMEDIATE)."""

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        await self._budget_turn(subject, rule)
        rows = await self._all(self._q.recent_auto_grants, [to_ms(since), subject, rule])
        return [
            (from_ms(r["not_before"]), from_ms(r["not_after"]), rec.at(r["ended_at"])) for r in rows
        ]

    async def insert_breakglass_codes(self, codes: Sequence[IssuedCode]) -> None:
        await self._many(
            self._q.insert_breakglass_code,
            [rec.breakglass_values(issued) for issued in codes],
        )

    async def get_breakglass_code(self, code_id: str) -> BreakglassCode | None:
        row = await self._one(self._q.get_breakglass_code, [code_id])
        return None if row is None else rec.breakglass_code(row)

    async def mark_breakglass_used(
        self, code_id: str, *, used_at: datetime, grant_id: str, used_by: str
    ) -> bool:
        changed = await self._run(
            self._q.mark_breakglass_used, [to_ms(used_at), grant_id, used_by, code_id]
        )
        return changed == 1

    async def void_breakglass_codes(
        self, key_id: str, *, issued_from: datetime, issued_to: datetime, now: datetime
    ) -> list[tuple[str, str, str]]:
        rows = await self._all(
            self._q.voidable_breakglass_codes,
            [to_ms(now), key_id, to_ms(issued_from), to_ms(issued_to)],
        )
        voided = []
        for r in rows:
            if await self._run(self._q.void_breakglass_code, [to_ms(now), r["id"]]) == 1:
                voided.append((r["id"], r["agent"], r["subject"]))
        return voided

    async def review_breakglass(self, code_id: str, *, at: datetime, by: str, note: str) -> bool:
        changed = await self._run(self._q.review_breakglass, [to_ms(at), by, note, code_id])
        return changed == 1

    async def locks_in_force(self, now: datetime) -> list[Lock]:
        return [rec.lock(r) for r in await self._all(self._q.locks_in_force, [to_ms(now)])]

    async def locked_grants(self, target: LockTarget, states: Iterable[GrantState]) -> list[Grant]:
        """Grants in `states` that the target matches, on agents still enrolled, per agent in
        the order they were granted."""
        where, args = lock_match(self._d, target, "g.")
        wanted = [s.value for s in states]
        rows = await self._all(
            f"SELECT {GRANT_COLUMNS_OF_G} FROM grants g JOIN agents a ON a.name = g.agent "
            f"WHERE a.removed_at IS NULL AND {self._d.in_list('g.state', wanted)} {where} "
            "ORDER BY g.agent, g.grant_seq",
            [*self._d.in_args(wanted), *args],
        )
        return [rec.grant(r) for r in rows]

    async def pending_requests(self) -> list[Request]:
        """Every PENDING request, oldest first (a new policy judges them all)."""
        return await self._requests(await self._all(self._q.pending_requests))

    async def locked_requests(self, target: LockTarget) -> list[Request]:
        """Pending requests the target matches."""
        where, args = lock_match(self._d, target, "r.")
        rows = await self._all(
            f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM} WHERE r.state = 'PENDING' {where} "
            "ORDER BY r.created_at, r.id",
            args,
        )
        return await self._requests(rows)

    async def get_user_record(self, name: str) -> tuple[frozenset[str], bool, str] | None:
        row = await self._one(self._q.get_user_record, [name])
        if row is None:
            return None
        return frozenset(json.loads(row["groups"])), bool(row["disabled"]), row["managed_by"]

    # Sweeps.

    # How a sweep takes due rows (appended to its subquery): PostgreSQL skips rows another
    # replica's sweep holds (FOR UPDATE SKIP LOCKED); SQLite's one writer needs nothing.
    _take_due: ClassVar[str]
    # Appended to a one-row read that must hold the row until commit (`hold_lock`).
    _hold_row: ClassVar[str]

    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, change: GrantChange = NO_CHANGE
    ) -> list[Moved]:
        """Compare-and-set up to `limit` grants past their not_after that may still expire
        (PENDING_DELIVERY, ACTIVE, REVOKING) to `state`, set-based: one UPDATE ... RETURNING per
        state left, no row read into Python before it moves."""
        mark = self._d.mark
        sets, args = grant_sets(self._d, list(DUE_GRANT_STATES), state, change)
        moved: list[Moved] = []
        for was in DUE_GRANT_STATES:
            if len(moved) >= limit:
                break
            # The repeated IN list lets SQLite use the partial index grants_live.
            rows = await self._all(
                f"UPDATE grants SET {sets} WHERE id IN (SELECT id FROM grants "
                f"WHERE state IN ({DUE_GRANT_IN}) AND state = {mark} AND not_after <= {mark} "
                f"ORDER BY not_after LIMIT {mark}{self._take_due}) AND state = {mark} "
                "RETURNING id, request_id, agent, subject, action",
                [*args, was.value, to_ms(now), limit - len(moved), was.value],
            )
            w = was.value
            moved.extend(
                Moved(r["id"], r["request_id"], r["agent"], r["subject"], r["action"], w)
                for r in rows
            )
        return moved

    async def move_due_requests(
        self, now: datetime, limit: int, *, state: RequestState, by: str, reason: str
    ) -> list[Moved]:
        """Compare-and-set up to `limit` PENDING requests past their TTL to `state`, set-based."""
        if state not in REQUEST_TRANSITIONS[RequestState.PENDING]:
            raise ValueError(f"request lifecycle has no step PENDING -> {state.value}")
        mark = self._d.mark
        rows = await self._all(
            f"UPDATE requests SET state = {mark}, decided_at = {mark}, decided_by = {mark}, "
            f"decision_reason = {mark} WHERE id IN (SELECT id FROM requests "
            f"WHERE state = 'PENDING' AND pending_expires_at <= {mark} "
            f"ORDER BY pending_expires_at LIMIT {mark}{self._take_due}) AND state = 'PENDING' "
            "RETURNING id, agent, subject, action",
            [state.value, to_ms(now), by, reason, to_ms(now), limit],
        )
        pending = RequestState.PENDING.value
        return [Moved(r["id"], "", r["agent"], r["subject"], r["action"], pending) for r in rows]

    # Requests and reviews.

    async def insert_request(self, r: Request) -> None:
        await self._later(self._q.insert_request, rec.request_values(r))

    async def insert_requests(self, requests: Sequence[Request]) -> None:
        """`insert_request` for many requests, one statement for all (group commit)."""
        await self._many(self._q.insert_request, [rec.request_values(r) for r in requests])

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
    ) -> bool:
        if state not in REQUEST_TRANSITIONS[expected]:
            raise ValueError(f"request lifecycle has no step {expected.value} -> {state.value}")
        count = await self._run(
            self._q.decide_request,
            [state.value, to_ms(at), by, reason, grant_id, request_id, expected.value],
        )
        return count == 1

    async def set_request_grants(self, request_id: str, grant_ids: Sequence[str]) -> None:
        """The grants a request for several agents made (its `grant_id` is the first)."""
        await self._later(self._q.set_request_grants, [json.dumps(list(grant_ids)), request_id])

    async def insert_review(self, request_id: str, review: Review) -> bool:
        """False when this reviewer has reviewed the request already."""
        count = await self._run(
            self._q.insert_review,
            [request_id, review.reviewer, review.decision.value, review.reason,
             to_ms(review.reviewed_at), json.dumps(list(review.groups)), review.via],
        )  # fmt: skip
        return count == 1

    # Grants.

    async def insert_grant(self, g: Grant) -> None:
        await self._later(self._q.insert_grant, rec.grant_values(g))

    async def insert_grants(self, grants: Sequence[Grant]) -> None:
        """`insert_grant` for many grants, one statement for all (group commit)."""
        await self._many(self._q.insert_grant, [rec.grant_values(g) for g in grants])

    async def move_grant(
        self,
        grant_id: str,
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        change: GrantChange = NO_CHANGE,
    ) -> bool:
        """Compare-and-set the grant's state, with the columns `change` sets. Only steps of the
        grant lifecycle (`GRANT_TRANSITIONS`) may be asked for."""
        expected = list(expected)
        states = [s.value for s in expected]
        sets, args = grant_sets(self._d, expected, state, change)
        count = await self._run(
            f"UPDATE grants SET {sets} WHERE id = {self._d.mark} "
            f"AND {self._d.in_list('state', states)}",
            [*args, grant_id, *self._d.in_args(states)],
        )
        return count == 1

    async def move_grants(
        self,
        grant_ids: Sequence[str],
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        change: GrantChange = NO_CHANGE,
    ) -> set[str]:
        """`move_grant` for many grants at once (one statement per chunk, not one per grant).
        Returns the ids that were in an expected state and moved."""
        d = self._d
        expected = list(expected)
        states = [s.value for s in expected]
        sets, args = grant_sets(d, expected, state, change)
        moved: set[str] = set()
        for chunk in d.chunks(grant_ids):
            rows = await self._all(
                f"UPDATE grants SET {sets} WHERE {d.in_list('id', chunk)} "
                f"AND {d.in_list('state', states)} RETURNING id",
                [*args, *d.in_args(chunk), *d.in_args(states)],
            )
            moved.update(row["id"] for row in rows)
        return moved

    async def extend_grant(
        self, grant_id: str, *, expected_not_after: datetime, not_after: datetime
    ) -> bool:
        """Compare-and-set a live grant's end to a later `not_after` (in place: same grant),
        counting the extension and keeping the first end. False when the grant is no longer
        PENDING_DELIVERY or ACTIVE or its end moved meanwhile."""
        count = await self._run(
            self._q.extend_grant, [to_ms(not_after), grant_id, to_ms(expected_not_after)]
        )
        return count == 1

    # The per-agent command log.

    async def append_command(
        self, agent: str, kind: CommandKind, grant_id: str, at: datetime, revoke_reason: str = ""
    ) -> int:
        """Give the command the agent's next sequence number (gap-free) and store it."""
        row = await self._one(self._q.next_command_seq, [agent])
        if row is None:
            raise Conflict(f"agent {agent} is not enrolled")
        seq = int(row["last_seq"])
        await self._later(
            self._q.insert_command, [agent, seq, kind.value, grant_id, revoke_reason, to_ms(at)]
        )
        if kind is CommandKind.GRANT:
            await self._later(self._q.set_grant_seq, [seq, grant_id])
        elif kind is CommandKind.REVOKE:
            await self._later(self._q.set_revoke_seq, [seq, grant_id])
        await self._commands_added([agent])
        return seq

    async def append_commands(
        self, commands: Sequence[tuple[str, CommandKind, str, datetime]], revoke_reason: str = ""
    ) -> list[int | None]:
        """`append_command` for many (agent, kind, grant id, instant) at once: each agent's next
        sequence numbers, gap-free and in the order given; None for a command whose agent is
        not enrolled (nothing is stored for it). Does not touch the grants: the caller stores
        the sequence numbers with them."""
        wanted: dict[str, int] = {}
        for agent, *_ in commands:
            wanted[agent] = wanted.get(agent, 0) + 1
        if not wanted:
            return []
        last = await self._advance_seqs(wanted)
        next_seq = {name: seq - wanted[name] + 1 for name, seq in last.items()}
        seqs: list[int | None] = []
        stored: list[tuple[Any, ...]] = []
        for agent, kind, grant_id, at in commands:
            seq = next_seq.get(agent)
            seqs.append(seq)
            if seq is not None:
                next_seq[agent] = seq + 1
                stored.append((agent, seq, kind.value, grant_id, revoke_reason, to_ms(at)))
        if stored:
            await self._many(self._q.insert_command, stored)
            await self._commands_added(row[0] for row in stored)
        return seqs

    async def append_revokes(
        self, grants: Sequence[Grant], at: datetime, revoke_reason: str
    ) -> dict[str, int]:
        """A revoke command for each grant (`append_commands`) and the grants' revoke_seq.
        Returns grant id -> seq."""
        seqs = await self.append_commands(
            [(g.agent, CommandKind.REVOKE, g.id, at) for g in grants], revoke_reason
        )
        if None in seqs:
            raise Conflict("an agent was removed meanwhile; try again")
        by_grant = {g.id: seq for g, seq in zip(grants, seqs, strict=True) if seq is not None}
        await self._set_revoke_seqs(by_grant)
        return by_grant

    async def _set_revoke_seqs(self, by_grant: dict[str, int]) -> None:
        await self._many(self._q.set_revoke_seq, [(q, g) for g, q in by_grant.items()])

    async def truncate_command_log(self, limit: int) -> Truncated:
        """Command-log retention: move at most `limit` agents' `log_start` up to their
        acknowledged prefix, then delete at most `limit` of the commands at or below it.

        The prefix ends at the lower of the agent's highest acked seq and its first
        unacknowledged (non-snapshot) command less one: every command at or below it is acked,
        or a snapshot whose ack was lost and that later acked commands passed. A resume
        (min(last_applied, first_unacked - 1)) never starts below it unless the agent lost
        state it had acknowledged; the Hello then answers with a snapshot."""
        agents = await self._run(self._q.advance_log_start, [limit])
        return Truncated(agents, await self._run(self._q.truncate_commands, [limit]))

    async def settle_unsent(
        self, agent: str, seqs: Sequence[int], at: datetime, reason: str
    ) -> list[int]:
        """Mark those of the agent's commands that are still unacknowledged as settled without
        being sent (NOT_APPLIED, `reason`); the seqs marked now. The agent's last_acked_seq
        stays: it acknowledged none of them."""
        marked = []
        for seq in seqs:
            if await self._run(self._q.settle_unsent, [to_ms(at), reason, agent, seq]) == 1:
                marked.append(seq)
        return marked

    async def supersede_commands(self, agent: str, snapshot_seq: int, at: datetime) -> int:
        """Mark the agent's commands before `snapshot_seq` that were never acknowledged as
        replaced by that snapshot (NOT_APPLIED): they are not sent again."""
        return await self._run(
            self._q.supersede_commands,
            [to_ms(at), f"replaced by snapshot {snapshot_seq}", agent, snapshot_seq],
        )

    # Locks.

    async def insert_lock(self, lock: Lock) -> None:
        await self._later(self._q.insert_lock, rec.lock_values(lock))

    async def hold_lock(self, lock_id: str) -> Lock | None:
        row = await self._one(self._q.get_lock + self._hold_row, [lock_id])
        return None if row is None else rec.lock(row)

    async def set_lock_handout(self, lock_id: str, after: str | None) -> None:
        await self._later(self._q.set_lock_handout, [after, lock_id])

    async def lift_lock(self, lock_id: str, at: datetime, by: str, reason: str) -> bool:
        return await self._run(self._q.lift_lock, [to_ms(at), by, reason, lock_id]) == 1

    # Agents, join tokens, users, tokens, certificates.

    async def enroll_agent(
        self, name: str, labels: dict[str, str], credential_hash: str, at: datetime,
        join_token_id: str = "",
    ) -> bool:  # fmt: skip
        """Create the agent, or give an existing one a new credential. True when it is new."""
        labels_json = rec.dumps(labels)
        count = await self._run(
            self._q.reenroll_agent, [labels_json, credential_hash, join_token_id, name]
        )
        if count == 1:
            return False
        await self._run(
            self._q.enroll_agent, [name, labels_json, credential_hash, to_ms(at), join_token_id]
        )
        return True

    async def agent_seen(
        self, name: str, at: datetime, *, labels: dict[str, str] | None = None,
        version: str | None = None, boot_id: str | None = None, replica: str | None = None,
    ) -> None:  # fmt: skip
        labels_json = None if labels is None else rec.dumps(labels)
        # Nothing reads its row count: it goes with the transaction's next trip (a group of
        # Hellos made one trip per agent here, while holding the write lock).
        await self._later(
            self._q.agent_seen, [to_ms(at), labels_json, version, boot_id, replica, name]
        )

    async def agent_left(self, name: str, replica: str, at: datetime) -> None:
        """The agent's stream on `replica` ended: seen now, and held by no replica unless
        another one took it meanwhile."""
        await self._later(self._q.agent_left, [to_ms(at), replica, name])

    async def remove_agent(self, name: str, at: datetime) -> bool:
        return await self._run(self._q.remove_agent, [to_ms(at), name]) == 1

    async def insert_join_token(
        self, token_hash: str, labels: dict[str, str], by: str, at: datetime,
        expires_at: datetime | None, max_uses: int | None, replaces: str | None = None,
    ) -> None:  # fmt: skip
        await self._run(
            self._q.insert_join_token,
            [token_hash, json.dumps(labels), by, to_ms(at), rec.ms(expires_at), max_uses,
             replaces],
        )  # fmt: skip

    async def use_join_token(self, token_hash: str, at: datetime) -> JoinToken | None:
        """Spend one use of a join token (compare-and-set); None if unusable."""
        row = await self._one(self._q.use_join_token, [token_hash, to_ms(at)])
        if row is None:
            return None
        return JoinToken(dict(json.loads(row["labels"])), row["replaces"], bool(row["reusable"]))

    async def revoke_join_token(self, token_id: str, at: datetime, by: str) -> bool:
        return await self._run(self._q.revoke_join_token, [to_ms(at), by, token_id]) >= 1

    async def upsert_user(self, name: str, groups: Iterable[str], at: datetime) -> None:
        await self._run(self._q.upsert_user, [name, json.dumps(sorted(groups)), to_ms(at)])

    async def insert_oidc_user(self, name: str, groups: Iterable[str], at: datetime) -> None:
        await self._run(self._q.insert_oidc_user, [name, json.dumps(sorted(groups)), to_ms(at)])

    async def set_user_disabled(self, name: str, disabled: bool) -> bool:
        return await self._run(self._q.set_user_disabled, [int(disabled), name]) == 1

    async def insert_token(
        self,
        token_hash: str,
        user: str,
        at: datetime,
        expires_at: datetime | None,
        label: str,
        scopes: Iterable[str] = (),
    ) -> bool:
        """Register a token hash; False when it was already registered."""
        count = await self._run(
            self._q.insert_token,
            [token_hash, user, label, to_ms(at), rec.ms(expires_at), rec.scopes_text(scopes)],
        )
        return count == 1

    async def revoke_token(self, token_id: str, at: datetime) -> bool:
        return await self._run(self._q.revoke_token, [to_ms(at), token_id]) >= 1

    async def revoke_certificate(self, serial: str, at: datetime, by: str, reason: str) -> bool:
        """False when the serial was revoked before."""
        return await self._run(self._q.revoke_certificate, [serial, to_ms(at), by, reason]) == 1

    # Policy, meta.

    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int:
        row = await self._one(self._q.next_policy_version)
        version = int(row["version"])
        await self._run(self._q.insert_policy, [version, text, sha256, to_ms(at), by])
        return version

    async def set_meta(self, key: str, value: str) -> None:
        await self._later(self._q.set_meta, [key, value])

    # The audit chain and the outbox.

    async def audit(self, entry: AuditEntry) -> AuditEvent | None:
        """Append an event to the hash chain. Returns None (and writes nothing) when an event
        with the same id is already stored: agent events are stored exactly once."""
        events = await self.audit_many([entry])
        return events[0] if events else None

    async def audit_many(
        self, entries: Sequence[AuditEntry], *, fresh: bool = False
    ) -> list[AuditEvent]:
        """`audit` for many entries, in order, as one batch: the chain is the same as entry by
        entry. Entries whose id is already stored are skipped. `fresh`: every id was made for
        these entries (`new_id`), so none can be stored: no look-up, and no trip to the
        database once the transaction knows the head."""
        if not entries:
            return []
        if fresh:
            (head_seq, head_hash), stored = await self._audit_head(), set[str]()
        else:
            # The head first: from here to commit no other transaction can add an event, so
            # the ids found stored below stay the only ones stored.
            (head_seq, head_hash), stored = await self._head_and_stored_ids(
                [entry.id for entry in entries]
            )
        with gc_paused():
            events, rows = rec.chain(entries, head_seq, head_hash, stored)
        if not rows:
            return []
        await self._many(self._q.insert_audit, rows)
        self._head = (events[-1].seq, events[-1].hash)
        self.new_audit.extend(events)
        await self._outbox(events)
        await self._audit_added(events)
        return events

    async def _head_and_stored_ids(self, ids: Sequence[str]) -> tuple[tuple[int, str], set[str]]:
        """The chain's head, then which of `ids` are stored already (a store may read both at
        once, as long as the head is read first or together)."""
        head = await self._audit_head()
        return head, await self._stored_audit_ids(ids)

    async def _stored_audit_ids(self, ids: Sequence[str]) -> set[str]:
        stored: set[str] = set()
        for chunk in self._d.chunks(ids):
            rows = await self._all(
                f"SELECT id FROM audit WHERE {self._d.in_list('id', chunk)}",
                self._d.in_args(chunk),
            )
            stored.update(row["id"] for row in rows)
        return stored

    async def _outbox(self, events: Sequence[AuditEvent]) -> None:
        """Notifiable events go to the outbox in the audit event's own transaction."""
        rows = [
            (
                n.id, n.kind.value, to_ms(n.at), n.actor, n.subject, n.agent, n.request_id,
                n.grant_id, rec.details_json(n.details),
            )
            for event in events
            if event.kind in NOTIFIABLE and (n := notice_for(event)) is not None
        ]  # fmt: skip
        await self._many(self._q.insert_outbox, rows)

    async def insert_receiver(self, spec: ReceiverSpec) -> bool:
        """False (and nothing written) when a receiver of that name exists. The first receiver
        starts from now: notices written while nobody received them are not sent to it."""
        first = await self._one(self._q.no_receivers)
        if first is not None and first["first"]:
            await self._run(self._q.start_outbox_cursor, [rec.OUTBOX_CURSOR])
        count = await self._run(
            self._q.insert_receiver,
            [
                spec.name, spec.kind.value, rec.details_json(dict(spec.settings)), spec.secret,
                rec.route_json(spec.route), to_ms(spec.created_at), spec.created_by,
            ],
        )  # fmt: skip
        return count == 1

    async def delete_receiver(self, name: str) -> bool:
        """Removes the receiver; its pending deliveries are given up (attempts stay in the log)."""
        if await self._run(self._q.delete_receiver, [name]) != 1:
            return False
        # Its deliveries to requesters too (`NAME:requester`, server/domain/receivers.py).
        await self._run(self._q.abandon_deliveries, [name, name + REQUESTER_SUFFIX])
        return True


class SqlStore(SqlReads):
    """The store's reads of committed data, and its own short writes (outside a `Tx`)."""

    @abstractmethod
    async def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the chain's newest event; (0, GENESIS) when empty."""

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[SqlTx]:
        """One write transaction as a block (see `Store.transaction`)."""

    @abstractmethod
    def _short_write(self) -> AbstractAsyncContextManager[SqlTx]:
        """A transaction for the store's own writes of a statement or two (replicas, secrets,
        checkpoints): on PostgreSQL without the audit head's lock that every `Tx` takes."""

    async def replica_seen(
        self, replica: str, address: str, version: str, started_at: datetime, at: datetime
    ) -> None:
        """Record that `replica` runs (at start, and then periodically)."""
        async with self._short_write() as tx:
            await tx._run(
                self._q.replica_seen, [replica, address, version, to_ms(started_at), to_ms(at)]
            )
            if started_at == at:
                # Started now: no agent stream is held by this replica yet (a crash left some).
                await tx._run(self._q.replica_started, [replica])

    async def replica_stopped(self, replica: str) -> None:
        """`replica` stopped on purpose: it is no longer listed as running (a killed one is
        taken as gone once it stops reporting), and it holds no agent stream."""
        async with self._short_write() as tx:
            await tx._run(self._q.delete_replica, [replica])
            await tx._run(self._q.replica_started, [replica])

    async def take_token(
        self, limiter: str, caller: str, rate: float, burst: int, at: datetime
    ) -> int:
        """Take one token from `caller`'s bucket of `limiter` (`burst` tokens at most, refilled
        at `rate` per second); the calls refused in a row, this one included (0: taken)."""
        async with self._short_write() as tx:
            row = await tx._one(self._q.take_token, bucket_args(limiter, caller, rate, burst, at))
        return int(row["refusals"])

    async def forget_full_buckets(self, limiter: str, at: datetime) -> int:
        """Delete the buckets of `limiter` that are full again at `at` (bounded storage)."""
        async with self._short_write() as tx:
            return await tx._run(self._q.forget_full_buckets, [limiter, to_ms(at)])

    async def put_secret(
        self, name: str, ciphertext: bytes, at: datetime, *, replace: bool = True
    ) -> bool:
        """Store a secret; with `replace=False` only if none is stored under `name` yet (the
        first replica to create it wins). True when stored."""
        sql = self._q.put_secret if replace else self._q.add_secret
        async with self._short_write() as tx:
            count = await tx._run(sql, [name, ciphertext, to_ms(at)])
        return count == 1

    async def add_secrets(self, secrets: Sequence[tuple[str, bytes]], at: datetime) -> bool:
        """Store every (name, ciphertext) of `secrets`, or none of them when the store holds
        any of those names already (another replica stored them first; on PostgreSQL a replica
        storing them at the same moment is waited for). True when stored."""
        try:
            async with self._short_write() as tx:
                for name, ciphertext in secrets:
                    if await tx._run(self._q.add_secret, [name, ciphertext, to_ms(at)]) != 1:
                        raise _Taken
        except _Taken:
            return False
        return True

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        async with self._short_write() as tx:
            await tx._run(
                self._q.add_checkpoint,
                [checkpoint.seq, checkpoint.hash, to_ms(checkpoint.at), checkpoint.key_id,
                 checkpoint.signature],
            )  # fmt: skip

    async def list_replicas(self) -> list[ReplicaInfo]:
        return [rec.replica(r) for r in await self._all(self._q.list_replicas)]

    async def get_secret(self, name: str) -> bytes | None:
        row = await self._one(self._q.get_secret, [name])
        return None if row is None else bytes(row["ciphertext"])

    async def checkpoints(self) -> list[Checkpoint]:
        return [rec.checkpoint(r) for r in await self._all(self._q.checkpoints)]

    async def last_checkpoint(self) -> Checkpoint | None:
        row = await self._one(self._q.last_checkpoint)
        return None if row is None else rec.checkpoint(row)

    async def list_requests(
        self, *, states: Sequence[RequestState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Request], str]:  # fmt: skip
        async with self._session() as db:
            rows, more = await db._newest_first(
                f"SELECT {REQUEST_COLUMNS} FROM {REQUEST_FROM}",
                "r.",
                [("r.state", [s.value for s in states]), ("r.subject", subject),
                 ("r.agent", agent)],
                page_token,
                limit,
            )  # fmt: skip
            requests = await db._requests(rows)
        return requests, rec.next_page(requests, more)

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        """(not_before, not_after, ended_at) of the grants the policy approved by itself for
        `subject` under `rule` after `since` (an automatic grant is made with its request)."""
        rows = await self._all(self._q.recent_auto_grants, [to_ms(since), subject, rule])
        return [
            (from_ms(r["not_before"]), from_ms(r["not_after"]), rec.at(r["ended_at"])) for r in rows
        ]

    async def list_grants(
        self, *, states: Sequence[GrantState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Grant], str]:  # fmt: skip
        rows, more = await self._newest_first(
            f"SELECT {GRANT_COLUMNS} FROM grants",
            "",
            [("state", [s.value for s in states]), ("subject", subject), ("agent", agent)],
            page_token,
            limit,
        )
        grants = [rec.grant(r) for r in rows]
        return grants, rec.next_page(grants, more)

    async def expiring_grants(self, after: datetime, until: datetime, limit: int) -> list[Grant]:
        """ACTIVE grants ending in (after, until], soonest first."""
        rows = await self._all(self._q.expiring_grants, [to_ms(after), to_ms(until), limit])
        return [rec.grant(r) for r in rows]

    async def unremoved_grants(self, agent: str) -> list[Grant]:
        return [rec.grant(r) for r in await self._all(self._q.unremoved_grants, [agent])]

    async def status_counts(self, now: datetime, ended_since: datetime) -> StatusCounts:
        """Counts for the mesh status and the metrics: live grants by state (the partial index
        grants_live and the agents table keep this cheap), grants ended since `ended_since`,
        pending requests, unacknowledged commands."""
        d = self._d
        async with self._session() as db:
            grants = {
                str(r["state"]): int(r["n"])
                for r in await db._all(
                    f"SELECT state, COUNT(*) AS n FROM grants WHERE {d.in_list('state', _LIVE)} "
                    "GROUP BY state",
                    d.in_args(_LIVE),
                )
            }
            for r in await db._all(
                f"SELECT state, COUNT(*) AS n FROM grants WHERE ended_at >= {d.mark} "
                f"AND {d.in_list('state', _LIVE, negate=True)} GROUP BY state",
                [to_ms(ended_since), *d.in_args(_LIVE)],
            ):
                grants[str(r["state"])] = int(r["n"])
            requests = {str(r["state"]): int(r["n"]) for r in await db._all(self._q.count_requests)}
            agents = await db._one(self._q.count_agents)
            locks = await db._one(self._q.count_locks, [to_ms(now)])
            policy = await db._one(self._q.policy_version)
            held = {
                str(r["replica"]): int(r["n"]) for r in await db._all(self._q.count_held_by_replica)
            }
        return StatusCounts(
            agents_enrolled=int(agents["n"]) if agents else 0,
            requests=requests,
            grants=grants,
            revokes_unacknowledged=grants.get("REVOKING", 0),
            commands_unacknowledged=int(agents["unacked"]) if agents else 0,
            locks_in_force=int(locks["n"]) if locks else 0,
            policy_version=int(policy["v"]) if policy else 0,
            connected_by_replica=held,
        )

    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None:
        row = await self._one(self._q.principal_for_token, [token_hash, to_ms(now)])
        return None if row is None else rec.token_principal(row)

    async def token_holder(self, token_hash: str) -> tuple[Principal, datetime | None] | None:
        row = await self._one(self._q.token_holder, [token_hash])
        return None if row is None else (rec.token_principal(row), rec.at(row["expires_at"]))

    async def identity_generation(self) -> int:
        # One indexed read: a change committed by any process or replica is seen by the next
        # call (SQLite overrides this with an inline read).
        row = await self._one(self._q.identity_generation)
        return 0 if row is None else int(row["value"])

    async def versions(self) -> tuple[int, int]:
        row = await self._one(self._q.versions)
        if row is None:
            return 0, 0
        return int(row["g"] or 0), int(row["v"] or 0)

    async def token_refusal(self, token_hash: str, now: datetime) -> tuple[str, str]:
        return rec.token_refusal(await self._one(self._q.token_refusal, [token_hash]), now)

    async def list_tokens(self, user: str) -> list[TokenInfo]:
        return [rec.token(r) for r in await self._all(self._q.list_tokens, [user, user])]

    async def list_join_tokens(self) -> list[JoinTokenInfo]:
        async with self._session() as db:
            tokens = await db._all(self._q.list_join_tokens)
            users = await db._all(self._q.join_token_users)
        used: dict[str, list[str]] = {}
        for a in users:
            used.setdefault(a["join_token_id"], []).append(a["name"])
        return [rec.join_token_info(t, used.get(t["id"], ())) for t in tokens]

    async def principal_for_user(self, name: str, serial: str) -> Principal | None:
        """The enabled user a client certificate names, unless that certificate was revoked."""
        row = await self._one(self._q.principal_for_user, [name, serial])
        if row is None:
            return None
        return Principal(name=row["name"], groups=frozenset(json.loads(row["groups"])))

    async def get_user(self, name: str) -> UserInfo | None:
        row = await self._one(self._q.get_user, [name])
        return None if row is None else rec.user(row)

    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]:
        rows = await self._all(self._q.commands_after, [agent, seq, limit])
        return [rec.command(r, agent) for r in rows]

    async def command_log_start(self, agent: str) -> int:
        """The seq at or below which the agent's commands may be truncated away (0: none)."""
        row = await self._one(self._q.command_log_start, [agent])
        return 0 if row is None else int(row["log_start"])

    async def first_unacked_seq(self, agent: str) -> int | None:
        row = await self._one(self._q.first_unacked_seq, [agent])
        return None if row is None or row["seq"] is None else int(row["seq"])

    async def first_unacked_seqs(self, agents: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for part in self._d.chunks(agents):
            rows = await self._all(
                # As `first_unacked_seq`, per agent.
                "SELECT agent, MIN(seq) AS seq FROM commands "
                f"WHERE {self._d.in_list('agent', part)} AND acked_at IS NULL "
                "AND kind <> 'snapshot' GROUP BY agent",
                self._d.in_args(part),
            )
            found.update((str(r["agent"]), int(r["seq"])) for r in rows)
        return found

    async def policy_version(self) -> int:
        """The newest policy version (0: none)."""
        row = await self._one(self._q.policy_version)
        return 0 if row is None else int(row["v"])

    async def current_policy(self) -> PolicyDocument | None:
        row = await self._one(self._q.current_policy)
        return None if row is None else rec.policy(row)

    async def list_audit(
        self, *, since: datetime | None, agent: str, subject: str, kind: str, grant_id: str,
        request_id: str, after_seq: int, limit: int,
    ) -> list[AuditEvent]:  # fmt: skip
        mark = self._d.mark
        where, args = filters(
            self._d,
            [("agent", agent), ("subject", subject), ("kind", kind), ("grant_id", grant_id),
             ("request_id", request_id)],
        )  # fmt: skip
        where.append(f"seq > {mark}")
        args.append(after_seq)
        if since is not None:
            where.append(f"at >= {mark}")
            args.append(to_ms(since))
        rows = await self._all(
            f"SELECT {AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT {mark}",
            [*args, limit],
        )
        return [rec.audit(r) for r in rows]

    async def due_scheduled(self, now: datetime, limit: int) -> list[Request]:
        """SCHEDULED requests whose start has come, earliest first."""
        async with self._session() as db:
            return await db._requests(await db._all(self._q.due_scheduled, [to_ms(now), limit]))

    async def requests_changed_after(self, after_seq: int, limit: int) -> list[tuple[str, int]]:
        """(request id, its latest audit seq) for requests with audit events after
        `after_seq`, in the order of those latest changes; plus, when `after_seq` is negative,
        nothing but the head: [("", head seq)]."""
        if after_seq < 0:
            return [("", (await self.audit_head())[0])]
        rows = await self._all(self._q.requests_changed_after, [after_seq, limit])
        return [(r["request_id"], int(r["last"])) for r in rows]

    async def audit_chain(self, after_seq: int, limit: int) -> list[AuditEvent]:
        return [rec.audit(r) for r in await self._all(self._q.audit_chain, [after_seq, limit])]

    async def next_deadline(self) -> datetime | None:
        row = await self._one(self._q.next_deadline)
        return None if row is None or row["t"] is None else from_ms(int(row["t"]))

    async def list_locks(self, *, include_ended: bool, now: datetime) -> list[Lock]:
        sql = f"SELECT {LOCK_COLUMNS} FROM locks"
        args: list[Any] = []
        if not include_ended:
            sql += " WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > "
            sql += f"{self._d.mark})"
            args.append(to_ms(now))
        rows = await self._all(sql + " ORDER BY created_at DESC, id DESC LIMIT 1000", args)
        return [rec.lock(r) for r in rows]

    async def list_breakglass_codes(
        self, *, unreviewed: bool, agent: str, subject: str, include_expired: bool, now: datetime
    ) -> list[BreakglassCode]:
        where, args = rec.breakglass_filter(
            unreviewed=unreviewed,
            agent=agent,
            subject=subject,
            include_expired=include_expired,
            now=now,
            mark=self._d.mark,
        )
        rows = await self._all(
            f"SELECT {BREAKGLASS_COLUMNS} FROM breakglass_codes WHERE {where} "
            "ORDER BY issued_at DESC, id DESC LIMIT 1000",
            args,
        )
        return [rec.breakglass_code(r) for r in rows]

    async def live_breakglass_codes(self, now: datetime) -> list[LiveCodes]:
        rows = await self._all(self._q.live_breakglass_codes, [to_ms(now)])
        return [rec.live_codes(r) for r in rows]


class SqlOutbox(ABC):
    """The sender's side of the outbox. Each method is its own short transaction, so the sender
    never holds a writer while it talks to a receiver. A store gives the two statements that
    lock differently: reading the routing cursor, and claiming due deliveries."""

    # The routing cursor's row (locked on PostgreSQL until the route is written).
    _cursor_sql: ClassVar[str]
    # Claim due deliveries (arguments: until, now, now, limit), returning event_seq, receiver,
    # attempts; on PostgreSQL skipping rows another sender holds.
    _claim_sql: ClassVar[str]

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    async def list_receivers(self) -> list[ReceiverSpec]:
        rows = await self._store._all(self._store._q.list_receivers)
        return [
            as_read(ReceiverSpec(
                r["name"], ReceiverKind(r["kind"]), json.loads(r["settings"]), r["secret"],
                rec.route(r["route"]), from_ms(r["created_at"]), r["created_by"],
            ))
            for r in rows
        ]  # fmt: skip

    async def unrouted(self, limit: int) -> tuple[int, list[tuple[int, Notice]]]:
        """The routing cursor, and the outbox entries after it (oldest first)."""
        cursor = int(await self._store.get_meta(rec.OUTBOX_CURSOR) or "0")
        rows = await self._store._all(self._store._q.unrouted, [cursor, limit])
        return cursor, [(int(r["seq"]), rec.notice(r)) for r in rows]

    async def route(
        self, cursor: int, upto: int, deliveries: Sequence[tuple[int, str]], now: datetime
    ) -> bool:
        """Create the deliveries of outbox entries (cursor, upto] and move the cursor, at once;
        False when another sender moved the cursor first (nothing written)."""
        async with self._store.transaction() as tx:
            current = await tx._one(self._cursor_sql, [rec.OUTBOX_CURSOR])
            if int(current["value"] if current else "0") != cursor:
                return False
            await tx._many(
                tx._q.insert_delivery, [(seq, name, to_ms(now)) for seq, name in deliveries]
            )
            await tx.set_meta(rec.OUTBOX_CURSOR, str(upto))
        return True

    async def claim(self, now: datetime, until: datetime, limit: int) -> list[Delivery]:
        """Claim up to `limit` due deliveries until `until` (others leave them alone meanwhile;
        a claim left by a crashed sender lapses then)."""
        async with self._store.transaction() as tx:
            rows = await tx._all(self._claim_sql, [to_ms(until), to_ms(now), to_ms(now), limit])
            if not rows:
                return []
            seqs = sorted({int(r["event_seq"]) for r in rows})
            notices = {
                int(r["seq"]): rec.notice(r)
                for r in await tx._all(
                    f"SELECT seq, {rec.OUTBOX_COLUMNS} FROM outbox "
                    f"WHERE {tx._d.in_list('seq', seqs)}",
                    tx._d.in_args(seqs),
                )
            }
        return sorted(
            (
                Delivery(
                    int(r["event_seq"]), r["receiver"], int(r["attempts"]),
                    notices[int(r["event_seq"])],
                )
                for r in rows
            ),
            key=lambda d: (d.event_seq, d.receiver),
        )  # fmt: skip

    async def record(
        self,
        delivery: Delivery,
        at: datetime,
        ok: bool,
        detail: str,
        next_at: datetime | None,
    ) -> None:
        """One attempt: logged; the delivery DELIVERED, PENDING again at `next_at`, or GAVE_UP
        (`next_at` None after a failure)."""
        attempt = delivery.attempts + 1
        if ok:
            state, due = DeliveryState.DELIVERED, to_ms(at)
        elif next_at is None:
            state, due = DeliveryState.GAVE_UP, to_ms(at)
        else:
            state, due = DeliveryState.PENDING, to_ms(next_at)
        async with self._store.transaction() as tx:
            await tx._run(
                tx._q.record_delivery,
                [
                    state.value, attempt, due, "" if ok else detail, to_ms(at) if ok else None,
                    delivery.event_seq, delivery.receiver,
                ],
            )  # fmt: skip
            await tx._run(
                tx._q.insert_attempt,
                [delivery.event_seq, delivery.receiver, attempt, to_ms(at), int(ok), detail],
            )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give claims back (a sender stopping before it tried them)."""
        if not deliveries:
            return
        async with self._store.transaction() as tx:
            await tx._many(tx._q.release_delivery, [(d.event_seq, d.receiver) for d in deliveries])

    async def prune(self, before: datetime) -> int:
        """Delete notices written before `before` that are routed and have no PENDING delivery
        (with their deliveries and attempts); how many."""
        async with self._store.transaction() as tx:
            cursor = await tx._one(tx._q.get_meta, [rec.OUTBOX_CURSOR])
            upto = int(cursor["value"]) if cursor else 0
            rows = await tx._all(tx._q.prunable_notices, [to_ms(before), upto])
            seqs = [int(r["seq"]) for r in rows]
            d = tx._d
            for chunk in d.chunks(seqs):
                for table, column in (
                    ("delivery_attempts", "event_seq"),
                    ("deliveries", "event_seq"),
                    ("outbox", "seq"),
                ):
                    await tx._run(
                        f"DELETE FROM {table} WHERE {d.in_list(column, chunk)}", d.in_args(chunk)
                    )
        return len(seqs)

    async def next_due(self) -> datetime | None:
        row = await self._store._one(self._store._q.next_delivery_due)
        return from_ms(row["t"]) if row and row["t"] is not None else None

    async def deliveries(
        self, *, receiver: str, states: Sequence[DeliveryState], limit: int, before: int
    ) -> list[DeliveryRecord]:
        """Deliveries, newest notice first; `before`: only notices older than this outbox seq
        (the page cursor)."""
        d = self._store._d
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if receiver:
            # A receiver's deliveries to requesters (`NAME:requester`) are its own too.
            where.append(f"d.receiver IN ({d.mark}, {d.mark})")
            args.extend(_and_to_requesters(receiver))
        if states:
            values = [s.value for s in states]
            where.append(d.in_list("d.state", values))
            args.extend(d.in_args(values))
        if before:
            where.append(f"d.event_seq < {d.mark}")
            args.append(before)
        rows = await self._store._all(
            "SELECT d.event_seq, o.event_id, o.kind, d.receiver, d.state, d.attempts, "
            "(SELECT MAX(a.at) FROM delivery_attempts a WHERE a.event_seq = d.event_seq "
            "AND a.receiver = d.receiver) AS last_at, d.next_at, d.last_error, "
            "o.request_id, o.grant_id FROM deliveries d JOIN outbox o ON o.seq = d.event_seq "
            f"WHERE {' AND '.join(where)} ORDER BY d.event_seq DESC, d.receiver LIMIT {d.mark}",
            [*args, limit],
        )
        return [
            DeliveryRecord(
                int(r["event_seq"]), r["event_id"], r["kind"], r["receiver"],
                DeliveryState(r["state"]), int(r["attempts"]), rec.at(r["last_at"]),
                rec.at(r["next_at"]) if r["state"] == "PENDING" else None, r["last_error"],
                r["request_id"], r["grant_id"],
            )
            for r in rows
        ]  # fmt: skip

    async def log(self, *, request_id: str, receiver: str, limit: int) -> list[AttemptRecord]:
        """Attempts, newest first, optionally for one request or one receiver."""
        mark = self._store._d.mark
        where, args = ["1 = 1"], []
        if request_id:
            where.append(f"o.request_id = {mark}")
            args.append(request_id)
        if receiver:
            where.append(f"a.receiver IN ({mark}, {mark})")
            args.extend(_and_to_requesters(receiver))
        rows = await self._store._all(
            "SELECT a.event_seq, o.event_id, o.kind, a.receiver, a.attempt, a.at, a.ok, "
            "a.detail, COALESCE(d.state, 'GAVE_UP') AS state FROM delivery_attempts a "
            "JOIN outbox o ON o.seq = a.event_seq "
            "LEFT JOIN deliveries d ON d.event_seq = a.event_seq AND d.receiver = a.receiver "
            f"WHERE {' AND '.join(where)} ORDER BY a.id DESC LIMIT {mark}",
            [*args, limit],
        )
        return [
            AttemptRecord(
                int(r["event_seq"]), r["event_id"], r["kind"], r["receiver"], int(r["attempt"]),
                from_ms(r["at"]), bool(r["ok"]), r["detail"], DeliveryState(r["state"]),
            )
            for r in rows
        ]  # fmt: skip


def _and_to_requesters(receiver: str) -> list[str]:
    """A receiver's name as filtered on, with its deliveries to requesters."""
    name, _ = split_target(receiver)
    return [name, name + REQUESTER_SUFFIX]
