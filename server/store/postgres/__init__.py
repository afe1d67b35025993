"""The PostgreSQL store (psycopg 3 with psycopg_pool): the coordinator's store when several
replicas share one database. The same contract as the SQLite store (tests/store/).

- Writes run at READ COMMITTED with explicit row locks: compare-and-set is `UPDATE ... WHERE
  state = ...` (a waiting writer re-checks the row once the other commits); per-agent sequence
  numbers come from `UPDATE agents SET last_seq = last_seq + n ... RETURNING` (the agent's row
  lock makes them gap-free across replicas); the audit chain's head is one row locked by every
  transaction that audits (one chain, no fork, no gap).
- `write(fn)` runs `fn` again on a serialization failure or deadlock (Teleport's RetryTx);
  `transaction()` runs once and reports them as `Conflict` ("try again").
- The expiry sweep takes due rows with `FOR UPDATE SKIP LOCKED`: replicas sweeping at the same
  moment never wait for each other and never move a row twice.
- Reads outside a write use any pooled connection in autocommit: committed data only.
- Versioned migrations (server/store/postgres/migrations/*.sql) are applied at open, or by
  `jitmesh-coordinator migrate`, under an advisory lock, each in its own transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

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
from server.domain.audit import GENESIS
from server.domain.errors import Conflict
from server.domain.lifecycle import DUE_GRANT_STATES, GRANT_TRANSITIONS, REQUEST_TRANSITIONS
from server.domain.models import (
    NO_CHANGE,
    AuditEntry,
    Checkpoint,
    Command,
    CommandKind,
    GrantChange,
    JoinToken,
    Moved,
    Principal,
    ReplicaInfo,
    StatusCounts,
)
from server.domain.notices import NOTIFIABLE, Notice, notice_for
from server.domain.receivers import (
    AttemptRecord,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    ReceiverKind,
    ReceiverSpec,
)
from server.store import rows as rec

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
Conn = psycopg.AsyncConnection[dict[str, Any]]

# Retries of a write that met a serialization failure or a deadlock, with jittered backoff.
RETRIES = 8
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
# The channel that wakes the replica holding an agent's stream; payload "replica|agent,agent".
COMMANDS_CHANNEL = "jitmesh_commands"
# The channel that tells replicas of new audit events; payload "replica|seq|request,request".
AUDIT_CHANNEL = "jitmesh_audit"
NOTIFY_PAYLOAD = 7000  # bytes of agent names per notification (PostgreSQL's limit is 8000)
# Advisory lock keys (any fixed numbers, used only by jitmesh).
_MIGRATE_LOCK = 0x6A69_746D_0001
_POLICY_LOCK = 0x6A69_746D_0002

_REQUEST_COLUMNS = rec.columns(rec.REQUEST_COLUMNS, "r.") + ", g.state AS grant_state"
_REQUEST_FROM = "requests r LEFT JOIN grants g ON g.id = r.grant_id"
_GRANT_COLUMNS = rec.columns(rec.GRANT_COLUMNS)
_GRANT_COLUMNS_G = ", ".join(f"g.{c} AS g_{c}" for c in rec.GRANT_COLUMNS)
_AUDIT_COLUMNS = rec.columns(rec.AUDIT_COLUMNS)
_LOCK_COLUMNS = rec.columns(rec.LOCK_COLUMNS)
_COMMANDS_AFTER = rec.commands_after_sql("%s")
_BREAKGLASS_COLUMNS = rec.columns(rec.BREAKGLASS_COLUMNS)
_CHECKPOINT_COLUMNS = "seq, hash, at, key_id, signature"
_LIVE_IN = ", ".join(f"'{s}'" for s in rec.LIVE_STATES)
_AGENT_COLUMNS = (
    "a.name, a.labels, a.enrolled_at, a.last_seen_at, a.version, a.last_acked_seq, a.last_seq, "
    "a.replica, "
    f"(SELECT COUNT(*) FROM grants g WHERE g.agent = a.name AND g.state IN ({_LIVE_IN})) "
    "AS live_grants"
)
_REQUEST_INSERT = (
    f"INSERT INTO requests ({rec.columns(rec.REQUEST_COLUMNS)}) "
    f"VALUES ({','.join(['%s'] * len(rec.REQUEST_COLUMNS))})"
)
_GRANT_INSERT = (
    f"INSERT INTO grants ({_GRANT_COLUMNS}) VALUES ({','.join(['%s'] * len(rec.GRANT_COLUMNS))})"
)
_COMMAND_INSERT = (
    "INSERT INTO commands (agent, seq, kind, grant_id, revoke_reason, created_at) "
    "VALUES (%s,%s,%s,%s,%s,%s)"
)
_AUDIT_INSERT = (
    f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES ({','.join(['%s'] * len(rec.AUDIT_COLUMNS))})"
)
_DUE_GRANT_STATES = DUE_GRANT_STATES
_OUTBOX_INSERT = (
    f"INSERT INTO outbox ({rec.OUTBOX_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
    "ON CONFLICT (event_id) DO NOTHING"
)


def with_schema(dsn: str, schema: str) -> str:
    """`dsn` with its search_path set to `schema` (one installation per schema)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _one(conn: Conn, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
    cur = await conn.execute(sql, args)
    return await cur.fetchone()


async def _all(conn: Conn, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = await conn.execute(sql, args)
    return await cur.fetchall()


async def _recent_auto_grants(
    conn: Conn, subject: str, rule: str, since: datetime
) -> list[tuple[datetime, datetime, datetime | None]]:
    rows = await _all(
        conn,
        "SELECT g.not_before, g.not_after, g.ended_at FROM requests r "
        "JOIN grants g ON g.id = r.grant_id WHERE r.created_at > %s AND r.subject = %s "
        "AND r.rule = %s AND r.decided_by LIKE 'policy:%%'",
        [to_ms(since), subject, rule],
    )
    return [
        (from_ms(r["not_before"]), from_ms(r["not_after"]), rec.at(r["ended_at"])) for r in rows
    ]


async def _rowcount(conn: Conn, sql: str, args: Sequence[Any] = ()) -> int:
    cur = await conn.execute(sql, args)
    return cur.rowcount


def _migration_files() -> list[Path]:
    return sorted(MIGRATIONS.glob("*.sql"))


async def migrate(dsn: str) -> list[str]:
    """Bring the database (or schema) `dsn` names to the newest schema; returns the migrations
    applied now. Safe to run from several replicas at once (an advisory lock orders them)."""
    applied_now: list[str] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", [_MIGRATE_LOCK])
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS jitmesh_migrations "
                "(id TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT id FROM jitmesh_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for path in _migration_files():
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text(encoding="utf-8").encode())
                    await conn.execute(
                        "INSERT INTO jitmesh_migrations (id) VALUES (%s)", [path.stem]
                    )
                applied_now.append(path.stem)
            await conn.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, %s) "
                "ON CONFLICT (id) DO NOTHING",
                [GENESIS],
            )
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", [_MIGRATE_LOCK])
    return applied_now


async def _get_request(conn: Conn, request_id: str) -> Request | None:
    row = await _one(
        conn, f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.id = %s", [request_id]
    )
    if row is None:
        return None
    reviews = await _reviews(conn, [request_id])
    return rec.request(row, reviews.get(request_id, ()))


async def _reviews(conn: Conn, ids: list[str]) -> dict[str, tuple[Review, ...]]:
    if not ids:
        return {}
    rows = await _all(
        conn,
        f"SELECT {rec.REVIEW_COLUMNS} FROM reviews "
        "WHERE request_id = ANY(%s) ORDER BY reviewed_at, reviewer",
        [ids],
    )
    return rec.reviews_by_request(rows)


async def _get_grant(conn: Conn, grant_id: str, *, for_update: bool = False) -> Grant | None:
    row = await _one(
        conn,
        f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = %s"
        + (" FOR UPDATE" if for_update else ""),
        [grant_id],
    )
    return None if row is None else rec.grant(row)


async def _get_agent(conn: Conn, name: str) -> Agent | None:
    row = await _one(
        conn,
        f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.name = %s AND a.removed_at IS NULL",
        [name],
    )
    return None if row is None else rec.agent(row)


async def _live_grants(conn: Conn, agent: str) -> list[Grant]:
    rows = await _all(
        conn,
        f"SELECT {_GRANT_COLUMNS} FROM grants WHERE agent = %s "
        "AND state IN ('PENDING_DELIVERY', 'ACTIVE') ORDER BY grant_seq",
        [agent],
    )
    return [rec.grant(r) for r in rows]


async def _agent_for_credential(conn: Conn, credential_hash: str) -> str | None:
    row = await _one(
        conn,
        "SELECT name FROM agents WHERE credential_hash = %s AND removed_at IS NULL",
        [credential_hash],
    )
    return None if row is None else str(row["name"])


async def _user_groups(conn: Conn, name: str) -> frozenset[str] | None:
    row = await _one(conn, "SELECT groups FROM users WHERE name = %s", [name])
    return None if row is None else frozenset(json.loads(row["groups"]))


async def _get_meta(conn: Conn, key: str) -> str | None:
    row = await _one(conn, "SELECT value FROM meta WHERE key = %s", [key])
    return None if row is None else str(row["value"])


def _lock_match(target: LockTarget, alias: str) -> tuple[str, list[str]]:
    """SQL conditions (each starting with AND) for rows a lock target matches. Lock subjects are
    stored case-folded (subjects are ASCII, so SQL lower() folds them the same way)."""
    where = ""
    args: list[str] = []
    if target.subject:
        where += f" AND lower({alias}subject) = %s"
        args.append(target.subject)
    if target.agent:
        where += f" AND {alias}agent = %s"
        args.append(target.agent)
    if target.action:
        where += f" AND {alias}action = %s"
        args.append(target.action)
    return where, args


async def _lock_in_force(
    conn: Conn, subject: str, agent: str, action: str, now: datetime
) -> Lock | None:
    row = await _one(
        conn,
        f"SELECT {_LOCK_COLUMNS} FROM locks WHERE lifted_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > %s) AND subject IN ('', %s) "
        "AND agent IN ('', %s) AND action IN ('', %s) ORDER BY created_at, id LIMIT 1",
        [to_ms(now), subject.lower(), agent, action],
    )
    return None if row is None else rec.lock(row)


def _grant_sets(
    expected: Sequence[GrantState], state: GrantState, change: GrantChange
) -> tuple[str, list[Any]]:
    for current in expected:
        if state is not current and state not in GRANT_TRANSITIONS[current]:
            raise ValueError(f"grant lifecycle has no step {current.value} -> {state.value}")
    sets = ["state = %s"]
    args: list[Any] = [state.value]
    for column, value in rec.grant_change(change):
        sets.append(f"{column} = %s")
        args.append(value)
    return ", ".join(sets), args


class PostgresTx:
    """One write transaction on one pooled connection."""

    def __init__(self, conn: Conn, replica: str = "") -> None:
        self._conn = conn
        self._replica = replica
        self._head: tuple[int, str] | None = None
        self.new_audit: list[AuditEvent] = []

    async def _audit_head(self) -> tuple[int, str]:
        if self._head is None:
            row = await _one(self._conn, "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            self._head = (0, GENESIS) if row is None else (int(row["seq"]), str(row["hash"]))
        return self._head

    async def get_request(self, request_id: str) -> Request | None:
        return await _get_request(self._conn, request_id)

    async def get_grant(self, grant_id: str) -> Grant | None:
        return await _get_grant(self._conn, grant_id)

    async def get_agent(self, name: str) -> Agent | None:
        return await _get_agent(self._conn, name)

    async def live_grants(self, agent: str) -> list[Grant]:
        return await _live_grants(self._conn, agent)

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        return await _agent_for_credential(self._conn, credential_hash)

    async def user_groups(self, name: str) -> frozenset[str] | None:
        return await _user_groups(self._conn, name)

    async def get_meta(self, key: str) -> str | None:
        return await _get_meta(self._conn, key)

    async def insert_request(self, r: Request) -> None:
        await self._conn.execute(_REQUEST_INSERT, rec.request_values(r))

    async def insert_requests(self, requests: Sequence[Request]) -> None:
        if requests:
            async with self._conn.cursor() as cur:
                await cur.executemany(_REQUEST_INSERT, [rec.request_values(r) for r in requests])

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
        count = await _rowcount(
            self._conn,
            "UPDATE requests SET state = %s, decided_at = %s, decided_by = %s, "
            "decision_reason = %s, grant_id = %s WHERE id = %s AND state = %s",
            [state.value, to_ms(at), by, reason, grant_id, request_id, expected.value],
        )
        return count == 1

    async def insert_review(self, request_id: str, review: Review) -> bool:
        count = await _rowcount(
            self._conn,
            "INSERT INTO reviews (request_id, reviewer, decision, reason, reviewed_at, groups) "
            "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (request_id, reviewer) DO NOTHING",
            [request_id, review.reviewer, review.decision.value, review.reason,
             to_ms(review.reviewed_at), json.dumps(list(review.groups))],
        )  # fmt: skip
        return count == 1

    async def insert_grant(self, g: Grant) -> None:
        await self._conn.execute(_GRANT_INSERT, rec.grant_values(g))

    async def insert_grants(self, grants: Sequence[Grant]) -> None:
        if grants:
            async with self._conn.cursor() as cur:
                await cur.executemany(_GRANT_INSERT, [rec.grant_values(g) for g in grants])

    async def move_grant(
        self,
        grant_id: str,
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        change: GrantChange = NO_CHANGE,
    ) -> bool:
        expected = list(expected)
        sets, args = _grant_sets(expected, state, change)
        count = await _rowcount(
            self._conn,
            f"UPDATE grants SET {sets} WHERE id = %s AND state = ANY(%s)",
            [*args, grant_id, [s.value for s in expected]],
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
        expected = list(expected)
        sets, args = _grant_sets(expected, state, change)
        if not grant_ids:
            return set()
        rows = await _all(
            self._conn,
            f"UPDATE grants SET {sets} WHERE id = ANY(%s) AND state = ANY(%s) RETURNING id",
            [*args, list(grant_ids), [s.value for s in expected]],
        )
        return {r["id"] for r in rows}

    async def append_command(
        self, agent: str, kind: CommandKind, grant_id: str, at: datetime, revoke_reason: str = ""
    ) -> int:
        row = await _one(
            self._conn,
            "UPDATE agents SET last_seq = last_seq + 1 WHERE name = %s AND removed_at IS NULL "
            "RETURNING last_seq",
            [agent],
        )
        if row is None:
            raise Conflict(f"agent {agent} is not enrolled")
        seq = int(row["last_seq"])
        await self._conn.execute(
            _COMMAND_INSERT, [agent, seq, kind.value, grant_id, revoke_reason, to_ms(at)]
        )
        if kind in (CommandKind.GRANT, CommandKind.REVOKE):
            column = "grant_seq" if kind is CommandKind.GRANT else "revoke_seq"
            await self._conn.execute(
                f"UPDATE grants SET {column} = %s WHERE id = %s", [seq, grant_id]
            )
        await self._notify([agent])
        return seq

    async def supersede_commands(self, agent: str, snapshot_seq: int, at: datetime) -> int:
        """Mark the agent's commands before `snapshot_seq` that were never acknowledged as
        replaced by that snapshot (NOT_APPLIED): they are not sent again."""
        return await _rowcount(
            self._conn,
            "UPDATE commands SET acked_at = %s, ack_status = 'NOT_APPLIED', ack_reason = %s "
            "WHERE agent = %s AND seq < %s AND acked_at IS NULL",
            [to_ms(at), f"replaced by snapshot {snapshot_seq}", agent, snapshot_seq],
        )

    async def extend_grant(
        self, grant_id: str, *, expected_not_after: datetime, not_after: datetime
    ) -> bool:
        """Compare-and-set a live grant's end to a later `not_after` (in place)."""
        count = await _rowcount(
            self._conn,
            "UPDATE grants SET not_after = %s, extensions = extensions + 1, "
            "original_not_after = COALESCE(original_not_after, not_after) "
            "WHERE id = %s AND state IN ('PENDING_DELIVERY', 'ACTIVE') AND not_after = %s",
            [to_ms(not_after), grant_id, to_ms(expected_not_after)],
        )
        return count == 1

    async def _notify(self, agents: Iterable[str]) -> None:
        """Wake the replicas holding these agents' streams once this transaction commits
        (NOTIFY is delivered at commit, never for a rollback). A hint only: a replica that
        misses it re-reads the log when the agent reconnects or the listener reconnects."""
        payloads: list[str] = []
        chunk: list[str] = []
        size = 0
        for agent in sorted(set(agents)):
            if size + len(agent) > NOTIFY_PAYLOAD:
                payloads.append(f"{self._replica}|{','.join(chunk)}")
                chunk, size = [], 0
            chunk.append(agent)
            size += len(agent) + 1
        if chunk:
            payloads.append(f"{self._replica}|{','.join(chunk)}")
        for payload in payloads:
            await self._conn.execute("SELECT pg_notify(%s, %s)", [COMMANDS_CHANNEL, payload])

    async def append_commands(
        self, commands: Sequence[tuple[str, CommandKind, str, datetime]], revoke_reason: str = ""
    ) -> list[int | None]:
        wanted: dict[str, int] = {}
        for agent, *_ in commands:
            wanted[agent] = wanted.get(agent, 0) + 1
        if not wanted:
            return []
        # Agents in name order: two replicas numbering overlapping agents lock them in the same
        # order, so they wait for each other instead of deadlocking.
        names = sorted(wanted)
        rows = await _all(
            self._conn,
            "UPDATE agents SET last_seq = agents.last_seq + w.n "
            "FROM (SELECT * FROM unnest(%s::text[], %s::bigint[]) AS u(name, n) ORDER BY name) w "
            "WHERE agents.name = w.name AND agents.removed_at IS NULL "
            "RETURNING agents.name, agents.last_seq",
            [names, [wanted[n] for n in names]],
        )
        next_seq = {r["name"]: int(r["last_seq"]) - wanted[r["name"]] + 1 for r in rows}
        seqs: list[int | None] = []
        stored: list[tuple[Any, ...]] = []
        for agent, kind, grant_id, at in commands:
            seq = next_seq.get(agent)
            seqs.append(seq)
            if seq is not None:
                next_seq[agent] = seq + 1
                stored.append((agent, seq, kind.value, grant_id, revoke_reason, to_ms(at)))
        if stored:
            async with self._conn.cursor() as cur:
                await cur.executemany(_COMMAND_INSERT, stored)
            await self._notify(row[0] for row in stored)
        return seqs

    async def ack_commands(
        self, acks: Sequence[tuple[str, int, str, str]], at: datetime
    ) -> dict[tuple[str, int], tuple[CommandKind, str, datetime]]:
        done: dict[tuple[str, int], tuple[CommandKind, str, datetime]] = {}
        when = to_ms(at)
        if not acks:
            return done
        rows = await _all(
            self._conn,
            "UPDATE commands SET acked_at = %s, ack_status = a.status, ack_reason = a.reason "
            "FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[]) "
            "AS a(agent, seq, status, reason) "
            "WHERE commands.agent = a.agent AND commands.seq = a.seq "
            # The first ack counts; except that a revoke the agent could not carry out and
            # later did (sent again after its restart) is acked again as done.
            "AND (commands.acked_at IS NULL OR (commands.kind = 'revoke' "
            "AND commands.ack_status <> 'APPLIED' AND a.status = 'APPLIED')) "
            "RETURNING commands.agent, commands.seq, commands.kind, commands.grant_id, "
            "commands.created_at",
            [
                when,
                [a[0] for a in acks],
                [a[1] for a in acks],
                [a[2] for a in acks],
                [a[3] for a in acks],
            ],
        )
        for r in rows:
            done[(r["agent"], int(r["seq"]))] = (
                CommandKind(r["kind"]),
                r["grant_id"],
                from_ms(r["created_at"]),
            )
        highest: dict[str, int] = {}
        for agent, seq in done:
            highest[agent] = max(seq, highest.get(agent, 0))
        if highest:
            names = sorted(highest)
            await self._conn.execute(
                "UPDATE agents SET last_acked_seq = GREATEST(agents.last_acked_seq, h.seq), "
                "last_seen_at = %s FROM unnest(%s::text[], %s::bigint[]) AS h(name, seq) "
                "WHERE agents.name = h.name",
                [when, names, [highest[n] for n in names]],
            )
        return done

    async def get_grants(self, grant_ids: Sequence[str]) -> dict[str, Grant]:
        if not grant_ids:
            return {}
        rows = await _all(
            self._conn,
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = ANY(%s)",
            [list(grant_ids)],
        )
        return {r["id"]: rec.grant(r) for r in rows}

    # Locks.

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        # Replicas checking the same budget take turns until commit (READ COMMITTED would let
        # two transactions both read the budget unused and both write a grant).
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"budget:{subject}:{rule}"]
        )
        return await _recent_auto_grants(self._conn, subject, rule, since)

    async def insert_breakglass_codes(self, codes: Sequence[tuple[BreakglassCode, str]]) -> None:
        async with self._conn.cursor() as cur:
            await cur.executemany(
                f"INSERT INTO breakglass_codes ({_BREAKGLASS_COLUMNS}) "
                f"VALUES ({','.join(['%s'] * len(rec.BREAKGLASS_COLUMNS))})",
                [rec.breakglass_values(code, digest) for code, digest in codes],
            )

    async def get_breakglass_code(self, code_id: str) -> BreakglassCode | None:
        row = await _one(
            self._conn,
            f"SELECT {_BREAKGLASS_COLUMNS} FROM breakglass_codes WHERE id = %s",
            [code_id],
        )
        return None if row is None else rec.breakglass_code(row)

    async def mark_breakglass_used(
        self, code_id: str, *, used_at: datetime, grant_id: str, used_by: str
    ) -> bool:
        count = await _rowcount(
            self._conn,
            "UPDATE breakglass_codes SET used_at = %s, grant_id = %s, used_by = %s "
            "WHERE id = %s AND used_at IS NULL",
            [to_ms(used_at), grant_id, used_by, code_id],
        )
        return count == 1

    async def review_breakglass(self, code_id: str, *, at: datetime, by: str, note: str) -> bool:
        count = await _rowcount(
            self._conn,
            "UPDATE breakglass_codes SET reviewed_at = %s, reviewed_by = %s, review_note = %s "
            "WHERE id = %s AND used_at IS NOT NULL AND reviewed_at IS NULL",
            [to_ms(at), by, note, code_id],
        )
        return count == 1

    async def insert_lock(self, lock: Lock) -> None:
        await self._conn.execute(
            f"INSERT INTO locks ({_LOCK_COLUMNS}) "
            f"VALUES ({','.join(['%s'] * len(rec.LOCK_COLUMNS))})",
            rec.lock_values(lock),
        )

    async def lift_lock(self, lock_id: str, at: datetime, by: str, reason: str) -> bool:
        count = await _rowcount(
            self._conn,
            "UPDATE locks SET lifted_at = %s, lifted_by = %s, lift_reason = %s "
            "WHERE id = %s AND lifted_at IS NULL",
            [to_ms(at), by, reason, lock_id],
        )
        return count == 1

    async def get_lock(self, lock_id: str) -> Lock | None:
        row = await _one(self._conn, f"SELECT {_LOCK_COLUMNS} FROM locks WHERE id = %s", [lock_id])
        return None if row is None else rec.lock(row)

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        return await _lock_in_force(self._conn, subject, agent, action, now)

    async def locks_in_force(self, now: datetime) -> list[Lock]:
        rows = await _all(
            self._conn,
            f"SELECT {_LOCK_COLUMNS} FROM locks WHERE lifted_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > %s) ORDER BY created_at, id",
            [to_ms(now)],
        )
        return [rec.lock(r) for r in rows]

    async def locked_grants(self, target: LockTarget, states: Iterable[GrantState]) -> list[Grant]:
        where, args = _lock_match(target, "g.")
        rows = await _all(
            self._conn,
            f"SELECT {rec.columns(rec.GRANT_COLUMNS, 'g.')} FROM grants g "
            "JOIN agents a ON a.name = g.agent "
            f"WHERE a.removed_at IS NULL AND g.state = ANY(%s) {where} "
            "ORDER BY g.agent, g.grant_seq",
            [[s.value for s in states], *args],
        )
        return [rec.grant(r) for r in rows]

    async def locked_requests(self, target: LockTarget) -> list[Request]:
        where, args = _lock_match(target, "r.")
        rows = await _all(
            self._conn,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'PENDING' {where} "
            "ORDER BY r.created_at, r.id",
            args,
        )
        reviews = await _reviews(self._conn, [r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def set_request_grants(self, request_id: str, grant_ids: Sequence[str]) -> None:
        """The grants a request for several agents made (its `grant_id` is the first)."""
        await self._conn.execute(
            "UPDATE requests SET grant_ids = %s WHERE id = %s",
            [json.dumps(list(grant_ids)), request_id],
        )

    async def list_agents(self) -> list[Agent]:
        rows = await _all(
            self._conn,
            f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.removed_at IS NULL ORDER BY a.name",
        )
        return [rec.agent(r) for r in rows]

    async def pending_requests(self) -> list[Request]:
        """Every PENDING request, oldest first (a new policy judges them all)."""
        rows = await _all(
            self._conn,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'PENDING' "
            "ORDER BY r.created_at, r.id",
        )
        reviews = await _reviews(self._conn, [r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def append_revokes(
        self, grants: Sequence[Grant], at: datetime, revoke_reason: str
    ) -> dict[str, int]:
        seqs = await self.append_commands(
            [(g.agent, CommandKind.REVOKE, g.id, at) for g in grants], revoke_reason
        )
        if None in seqs:
            raise Conflict("an agent was removed meanwhile; try again")
        by_grant = {g.id: seq for g, seq in zip(grants, seqs, strict=True) if seq is not None}
        if by_grant:
            await self._conn.execute(
                "UPDATE grants SET revoke_seq = u.seq FROM unnest(%s::text[], %s::bigint[]) "
                "AS u(id, seq) WHERE grants.id = u.id",
                [list(by_grant), list(by_grant.values())],
            )
        return by_grant

    # Agents, tokens, users.

    async def enroll_agent(
        self, name: str, labels: dict[str, str], credential_hash: str, at: datetime,
        join_token_id: str = "",
    ) -> bool:  # fmt: skip
        count = await _rowcount(
            self._conn,
            "UPDATE agents SET labels = %s, credential_hash = %s, removed_at = NULL, "
            "join_token_id = %s WHERE name = %s",
            [rec.dumps(labels), credential_hash, join_token_id, name],
        )
        if count == 1:
            return False
        await self._conn.execute(
            "INSERT INTO agents (name, labels, credential_hash, enrolled_at, join_token_id) "
            "VALUES (%s,%s,%s,%s,%s)",
            [name, rec.dumps(labels), credential_hash, to_ms(at), join_token_id],
        )
        return True

    async def agent_seen(
        self, name: str, at: datetime, *, labels: dict[str, str] | None = None,
        version: str | None = None, boot_id: str | None = None, replica: str | None = None,
    ) -> None:  # fmt: skip
        await self._conn.execute(
            "UPDATE agents SET last_seen_at = %s, labels = COALESCE(%s, labels), "
            "version = COALESCE(%s, version), boot_id = COALESCE(%s, boot_id), "
            "replica = COALESCE(%s, replica) WHERE name = %s",
            [
                to_ms(at),
                None if labels is None else rec.dumps(labels),
                version,
                boot_id,
                replica,
                name,
            ],
        )

    async def agent_left(self, name: str, replica: str, at: datetime) -> None:
        """The agent's stream on `replica` ended: seen now, and held by no replica unless
        another one took it meanwhile."""
        await self._conn.execute(
            "UPDATE agents SET last_seen_at = %s, "
            "replica = CASE WHEN replica = %s THEN '' ELSE replica END WHERE name = %s",
            [to_ms(at), replica, name],
        )

    async def remove_agent(self, name: str, at: datetime) -> bool:
        count = await _rowcount(
            self._conn,
            "UPDATE agents SET removed_at = %s, credential_hash = NULL "
            "WHERE name = %s AND removed_at IS NULL",
            [to_ms(at), name],
        )
        return count == 1

    async def insert_join_token(
        self, token_hash: str, labels: dict[str, str], by: str, at: datetime,
        expires_at: datetime | None, max_uses: int | None, replaces: str | None = None,
    ) -> None:  # fmt: skip
        await self._conn.execute(
            "INSERT INTO join_tokens "
            "(hash, labels, created_by, created_at, expires_at, max_uses, replaces) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (hash) DO UPDATE SET "
            "labels = excluded.labels, created_by = excluded.created_by, "
            "created_at = excluded.created_at, expires_at = excluded.expires_at, "
            "max_uses = excluded.max_uses, replaces = excluded.replaces, uses = 0",
            [token_hash, json.dumps(labels), by, to_ms(at), rec.ms(expires_at), max_uses,
             replaces],
        )  # fmt: skip

    async def use_join_token(self, token_hash: str, at: datetime) -> JoinToken | None:
        row = await _one(
            self._conn,
            "UPDATE join_tokens SET uses = uses + 1 WHERE hash = %s AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > %s) "
            "AND (max_uses IS NULL OR uses < max_uses) "
            "RETURNING labels, replaces, max_uses IS NULL AS reusable",
            [token_hash, to_ms(at)],
        )
        if row is None:
            return None
        return JoinToken(dict(json.loads(row["labels"])), row["replaces"], bool(row["reusable"]))

    async def get_user_record(self, name: str) -> tuple[frozenset[str], bool, str] | None:
        row = await _one(
            self._conn, "SELECT groups, disabled, managed_by FROM users WHERE name = %s", [name]
        )
        if row is None:
            return None
        return (frozenset(json.loads(row["groups"])), bool(row["disabled"]), row["managed_by"])

    async def insert_oidc_user(self, name: str, groups: Iterable[str], at: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO users (name, groups, created_at, managed_by) VALUES (%s,%s,%s,'oidc')",
            [name, json.dumps(sorted(groups)), to_ms(at)],
        )

    async def insert_receiver(self, spec: ReceiverSpec) -> bool:
        """False (and nothing written) when a receiver of that name exists. The first receiver
        starts from now: notices written while nobody received them are not sent to it."""
        first = await _one(self._conn, "SELECT NOT EXISTS (SELECT 1 FROM receivers) AS first")
        if first is not None and first["first"]:
            await self._conn.execute(
                "INSERT INTO meta (key, value) SELECT %s, CAST(COALESCE(MAX(seq), 0) AS TEXT) "
                "FROM outbox ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [rec.OUTBOX_CURSOR],
            )
        count = await _rowcount(
            self._conn,
            "INSERT INTO receivers (name, kind, settings, secret, route, created_at, created_by) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
            [
                spec.name, spec.kind.value, rec.details_json(dict(spec.settings)), spec.secret,
                rec.route_json(spec.route), to_ms(spec.created_at), spec.created_by,
            ],
        )  # fmt: skip
        return count == 1

    async def delete_receiver(self, name: str) -> bool:
        """Removes the receiver; its pending deliveries are given up (attempts stay in the log)."""
        count = await _rowcount(self._conn, "DELETE FROM receivers WHERE name = %s", [name])
        if count != 1:
            return False
        await self._conn.execute(
            "UPDATE deliveries SET state = 'GAVE_UP', last_error = 'receiver removed' "
            "WHERE receiver = %s AND state = 'PENDING'",
            [name],
        )
        return True

    async def revoke_join_token(self, token_id: str, at: datetime, by: str) -> bool:
        count = await _rowcount(
            self._conn,
            "UPDATE join_tokens SET revoked_at = %s, revoked_by = %s "
            "WHERE substr(hash, 1, 16) = %s AND revoked_at IS NULL",
            [to_ms(at), by, token_id],
        )
        return count >= 1

    async def upsert_user(self, name: str, groups: Iterable[str], at: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO users (name, groups, created_at) VALUES (%s,%s,%s) "
            "ON CONFLICT (name) DO UPDATE SET groups = excluded.groups",
            [name, json.dumps(sorted(groups)), to_ms(at)],
        )

    async def insert_token(
        self,
        token_hash: str,
        user: str,
        at: datetime,
        expires_at: datetime | None,
        label: str,
        scopes: Iterable[str] = (),
    ) -> bool:
        count = await _rowcount(
            self._conn,
            "INSERT INTO tokens (hash, user_name, label, created_at, expires_at, scopes) "
            "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (hash) DO NOTHING",
            [token_hash, user, label, to_ms(at), rec.ms(expires_at), rec.scopes_text(scopes)],
        )
        return count == 1

    async def revoke_token(self, token_id: str, at: datetime) -> bool:
        count = await _rowcount(
            self._conn,
            "UPDATE tokens SET revoked_at = %s WHERE substr(hash, 1, 16) = %s "
            "AND revoked_at IS NULL",
            [to_ms(at), token_id],
        )
        return count >= 1

    async def set_user_disabled(self, name: str, disabled: bool) -> bool:
        count = await _rowcount(
            self._conn, "UPDATE users SET disabled = %s WHERE name = %s", [int(disabled), name]
        )
        return count == 1

    async def revoke_certificate(self, serial: str, at: datetime, by: str, reason: str) -> bool:
        count = await _rowcount(
            self._conn,
            "INSERT INTO revoked_certificates (serial, revoked_at, revoked_by, reason) "
            "VALUES (%s,%s,%s,%s) ON CONFLICT (serial) DO NOTHING",
            [serial, to_ms(at), by, reason],
        )
        return count == 1

    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int:
        # Versions are numbered in one order across replicas.
        await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", [_POLICY_LOCK])
        row = await _one(
            self._conn, "SELECT COALESCE(MAX(version), 0) + 1 AS version FROM policies"
        )
        assert row is not None
        version = int(row["version"])
        await self._conn.execute(
            "INSERT INTO policies (version, yaml, sha256, applied_at, applied_by) "
            "VALUES (%s,%s,%s,%s,%s)",
            [version, text, sha256, to_ms(at), by],
        )
        return version

    async def set_meta(self, key: str, value: str) -> None:
        await self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )

    # Audit.

    async def audit(self, entry: AuditEntry) -> AuditEvent | None:
        events = await self.audit_many([entry])
        return events[0] if events else None

    async def audit_many(self, entries: Sequence[AuditEntry]) -> list[AuditEvent]:
        if not entries:
            return []
        # The head first: from here to commit no other transaction can add an event, so the
        # ids found stored below stay the only ones stored.
        head_seq, head_hash = await self._audit_head()
        rows = await _all(
            self._conn,
            "SELECT id FROM audit WHERE id = ANY(%s)",
            [[entry.id for entry in entries]],
        )
        stored = {r["id"] for r in rows}
        events, values = rec.chain(entries, head_seq, head_hash, stored)
        if not values:
            return []
        async with self._conn.cursor() as cur:
            await cur.executemany(_AUDIT_INSERT, values)
        self._head = (events[-1].seq, events[-1].hash)
        # Notifiable events go to the outbox in the audit event's own transaction.
        notices = [
            (
                n.id, n.kind.value, to_ms(n.at), n.actor, n.subject, n.agent, n.request_id,
                n.grant_id, rec.details_json(n.details),
            )
            for event in events
            if event.kind in NOTIFIABLE and (n := notice_for(event)) is not None
        ]  # fmt: skip
        if notices:
            async with self._conn.cursor() as cur:
                await cur.executemany(_OUTBOX_INSERT, notices)
        await self._conn.execute(
            "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", list(self._head)
        )
        self.new_audit.extend(events)
        # Watchers on the other replicas (request watch, audit tail) learn of it at commit.
        ids = sorted({e.request_id for e in events if e.request_id})
        listed = ",".join(ids) if sum(len(i) + 1 for i in ids) < NOTIFY_PAYLOAD else "*"
        await self._conn.execute(
            "SELECT pg_notify(%s, %s)",
            [AUDIT_CHANNEL, f"{self._replica}|{events[-1].seq}|{listed}"],
        )
        return events

    # Sweeps.

    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, change: GrantChange = NO_CHANGE
    ) -> list[Moved]:
        """Up to `limit` due grants to `state`. Rows another replica's sweep holds are skipped
        (SKIP LOCKED): that sweep moves them."""
        sets, args = _grant_sets(list(_DUE_GRANT_STATES), state, change)
        moved: list[Moved] = []
        for was in _DUE_GRANT_STATES:
            if len(moved) >= limit:
                break
            rows = await _all(
                self._conn,
                f"UPDATE grants SET {sets} WHERE id IN (SELECT id FROM grants "
                "WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING') AND state = %s "
                "AND not_after <= %s ORDER BY not_after LIMIT %s FOR UPDATE SKIP LOCKED) "
                "AND state = %s RETURNING id, request_id, agent, subject, action",
                [*args, was.value, to_ms(now), limit - len(moved), was.value],
            )
            moved.extend(
                Moved(r["id"], r["request_id"], r["agent"], r["subject"], r["action"], was.value)
                for r in rows
            )
        return moved

    async def move_due_requests(
        self, now: datetime, limit: int, *, state: RequestState, by: str, reason: str
    ) -> list[Moved]:
        if state not in REQUEST_TRANSITIONS[RequestState.PENDING]:
            raise ValueError(f"request lifecycle has no step PENDING -> {state.value}")
        rows = await _all(
            self._conn,
            "UPDATE requests SET state = %s, decided_at = %s, decided_by = %s, "
            "decision_reason = %s WHERE id IN (SELECT id FROM requests WHERE state = 'PENDING' "
            "AND pending_expires_at <= %s ORDER BY pending_expires_at LIMIT %s "
            "FOR UPDATE SKIP LOCKED) AND state = 'PENDING' RETURNING id, agent, subject, action",
            [state.value, to_ms(now), by, reason, to_ms(now), limit],
        )
        pending = RequestState.PENDING.value
        return [Moved(r["id"], "", r["agent"], r["subject"], r["action"], pending) for r in rows]


class PostgresStore:
    def __init__(self, pool: AsyncConnectionPool[Conn], dsn: str) -> None:
        self._pool = pool
        self.dsn = dsn
        self._commits = 0
        self.retries = 0
        # This replica's id: its own notifications are not delivered back to it.
        self.replica = ""
        # Every write transaction takes the audit head's row lock first: writes from all
        # replicas then run one at a time in one order, so they never deadlock, and the chain
        # has one head (docs/scaling.md, "The audit chain", for the measurement). False: take it
        # at the first audit event only (more overlap, deadlocks retried by `write`).
        self.head_first = True
        # Told how long each committed write transaction took (the metrics); must not raise.
        self.observe_transaction: Callable[[float], None] | None = None

    @property
    def commits(self) -> int:
        """Write transactions committed by this store object since it was opened."""
        return self._commits

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 10, migrate_now: bool = True
    ) -> PostgresStore:
        if migrate_now:
            await migrate(dsn)
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="jitmesh",
        )
        await pool.open(wait=True, timeout=30)
        return cls(pool, dsn)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        """One write transaction, run once: a serialization failure or deadlock is reported as
        `Conflict` ("try again"); `write` retries instead."""
        began = time.monotonic()
        try:
            async with self._pool.connection() as conn, conn.transaction():
                tx = PostgresTx(conn, self.replica)
                if self.head_first:
                    await tx._audit_head()
                yield tx
        except _RETRYABLE as exc:
            raise Conflict("the store was busy with a conflicting change; try again") from exc
        self._commits += 1
        if self.observe_transaction is not None:
            self.observe_transaction(time.monotonic() - began)

    async def write(self, work: Callable[[PostgresTx], Awaitable[T]]) -> T:
        """Run `work` in one transaction and commit; again, from the start, on a serialization
        failure or deadlock (up to RETRIES times, with jittered backoff)."""
        for attempt in range(RETRIES + 1):
            started = time.monotonic()
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    tx = PostgresTx(conn, self.replica)
                    if self.head_first:
                        await tx._audit_head()
                    result = await work(tx)
            except _RETRYABLE as exc:
                if attempt == RETRIES:
                    raise Conflict(
                        "the store stayed busy with conflicting changes; try again"
                    ) from exc
                self.retries += 1
                await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
                continue
            self._commits += 1
            if self.observe_transaction is not None:
                self.observe_transaction(time.monotonic() - started)
            return result
        raise AssertionError("unreachable")

    # Replicas and shared secrets.

    async def replica_seen(
        self, replica: str, address: str, version: str, started_at: datetime, at: datetime
    ) -> None:
        """Record that `replica` runs (at start, and then periodically)."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO replicas (id, address, version, started_at, last_seen_at) "
                "VALUES (%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET "
                "address = excluded.address, "
                "version = excluded.version, started_at = excluded.started_at, "
                "last_seen_at = excluded.last_seen_at",
                [replica, address, version, to_ms(started_at), to_ms(at)],
            )
            if started_at == at:
                # Started now: no agent stream is held by this replica yet (a crash left some).
                await conn.execute("UPDATE agents SET replica = '' WHERE replica = %s", [replica])

    async def list_replicas(self) -> list[ReplicaInfo]:
        async with self._read() as conn:
            rows = await _all(
                conn,
                "SELECT id, address, version, started_at, last_seen_at FROM replicas ORDER BY id",
            )
        return [rec.replica(r) for r in rows]

    async def get_secret(self, name: str) -> bytes | None:
        async with self._read() as conn:
            row = await _one(conn, "SELECT ciphertext FROM secrets WHERE name = %s", [name])
        return None if row is None else bytes(row["ciphertext"])

    async def put_secret(
        self, name: str, ciphertext: bytes, at: datetime, *, replace: bool = True
    ) -> bool:
        """Store a secret; with `replace=False` only if none is stored under `name` yet (the
        first replica to create it wins). True when stored."""
        conflict = (
            "DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at"
            if replace
            else "DO NOTHING"
        )
        async with self._read() as conn:
            cur = await conn.execute(
                "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (%s,%s,%s) "
                f"ON CONFLICT (name) {conflict}",
                [name, ciphertext, to_ms(at)],
            )
        return cur.rowcount == 1

    async def listen(
        self,
        wake: Callable[[list[str] | None], None],
        changed: Callable[[int, list[str]], Awaitable[None]] | None = None,
    ) -> None:
        """Run until cancelled: call `wake(agents)` when another replica committed commands for
        them, and `wake(None)` after (re)connecting, when notifications may have been missed;
        `changed(audit_seq, request_ids)` when another replica committed audit events (request
        ids ["*"]: any request may have changed), so watchers here see it at once."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {COMMANDS_CHANNEL}")
                    await conn.execute(f"LISTEN {AUDIT_CHANNEL}")
                    wake(None)
                    if changed is not None:
                        await changed((await self.audit_head())[0], ["*"])
                    async for note in conn.notifies():
                        origin, _, rest = note.payload.partition("|")
                        if origin == self.replica or not rest:
                            continue
                        if note.channel == COMMANDS_CHANNEL:
                            wake(rest.split(","))
                        elif changed is not None:
                            seq, _, ids = rest.partition("|")
                            await changed(int(seq), [i for i in ids.split(",") if i])
            except psycopg.Error as exc:
                log.warning("command notifications interrupted, listening again: %s", exc)
                await asyncio.sleep(1.0)

    # Reads: committed data only.

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Conn]:
        async with self._pool.connection() as conn:
            yield conn

    async def audit_head(self) -> tuple[int, str]:
        async with self._read() as conn:
            row = await _one(conn, "SELECT seq, hash FROM audit_head WHERE id = 1")
        return (0, GENESIS) if row is None else (int(row["seq"]), str(row["hash"]))

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        async with self._read() as conn:
            await conn.execute(
                "INSERT INTO checkpoints (seq, hash, at, key_id, signature) "
                "VALUES (%s,%s,%s,%s,%s)",
                [checkpoint.seq, checkpoint.hash, to_ms(checkpoint.at), checkpoint.key_id,
                 checkpoint.signature],
            )  # fmt: skip

    async def checkpoints(self) -> list[Checkpoint]:
        async with self._read() as conn:
            rows = await _all(conn, f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id")
        return [rec.checkpoint(r) for r in rows]

    async def last_checkpoint(self) -> Checkpoint | None:
        async with self._read() as conn:
            row = await _one(
                conn, f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id DESC LIMIT 1"
            )
        return None if row is None else rec.checkpoint(row)

    async def get_request(self, request_id: str) -> Request | None:
        async with self._read() as conn:
            return await _get_request(conn, request_id)

    async def list_requests(
        self, *, states: Sequence[RequestState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Request], str]:  # fmt: skip
        async with self._read() as conn:
            rows, more = await _newest_first(
                conn,
                f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM}",
                "r.",
                [("r.state", [s.value for s in states]), ("r.subject", subject),
                 ("r.agent", agent)],
                page_token,
                limit,
            )  # fmt: skip
            reviews = await _reviews(conn, [r["id"] for r in rows])
        requests = [rec.request(r, reviews.get(r["id"], ())) for r in rows]
        return requests, rec.next_page(requests, more)

    async def get_grant(self, grant_id: str) -> Grant | None:
        async with self._read() as conn:
            return await _get_grant(conn, grant_id)

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        """(not_before, not_after, ended_at) of the grants the policy approved by itself for
        `subject` under `rule` after `since` (an automatic grant is made with its request)."""
        async with self._read() as conn:
            return await _recent_auto_grants(conn, subject, rule, since)

    async def list_grants(
        self, *, states: Sequence[GrantState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Grant], str]:  # fmt: skip
        async with self._read() as conn:
            rows, more = await _newest_first(
                conn,
                f"SELECT {_GRANT_COLUMNS} FROM grants",
                "",
                [("state", [s.value for s in states]), ("subject", subject), ("agent", agent)],
                page_token,
                limit,
            )
        grants = [rec.grant(r) for r in rows]
        return grants, rec.next_page(grants, more)

    async def expiring_grants(self, after: datetime, until: datetime, limit: int) -> list[Grant]:
        """ACTIVE grants ending in (after, until], soonest first."""
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_GRANT_COLUMNS} FROM grants WHERE state = 'ACTIVE' "
                "AND not_after > %s AND not_after <= %s ORDER BY not_after LIMIT %s",
                [to_ms(after), to_ms(until), limit],
            )
        return [rec.grant(r) for r in rows]

    async def unremoved_grants(self, agent: str) -> list[Grant]:
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_GRANT_COLUMNS} FROM grants WHERE agent = %s "
                "AND state IN ('REVOKING', 'REVOKE_FAILED') ORDER BY revoke_seq",
                [agent],
            )
        return [rec.grant(r) for r in rows]

    async def status_counts(self, now: datetime, ended_since: datetime) -> StatusCounts:
        """Counts for the mesh status and the metrics (as in the SQLite store)."""
        live = ["PENDING_DELIVERY", "ACTIVE", "REVOKING", "REVOKE_FAILED"]
        async with self._read() as conn:
            grants = {
                str(r["state"]): int(r["n"])
                for r in await _all(
                    conn,
                    "SELECT state, COUNT(*) AS n FROM grants WHERE state = ANY(%s) GROUP BY state",
                    [live],
                )
            }
            for r in await _all(
                conn,
                "SELECT state, COUNT(*) AS n FROM grants WHERE ended_at >= %s "
                "AND NOT (state = ANY(%s)) GROUP BY state",
                [to_ms(ended_since), live],
            ):
                grants[str(r["state"])] = int(r["n"])
            requests = {
                str(r["state"]): int(r["n"])
                for r in await _all(
                    conn,
                    "SELECT state, COUNT(*) AS n FROM requests "
                    "WHERE state IN ('PENDING', 'SCHEDULED') GROUP BY state",
                )
            }
            agents = await _one(
                conn,
                "SELECT COUNT(*) AS n, COALESCE(SUM(GREATEST(last_seq - last_acked_seq, 0)), 0) "
                "AS unacked FROM agents WHERE removed_at IS NULL",
            )
            locks = await _one(
                conn,
                "SELECT COUNT(*) AS n FROM locks WHERE lifted_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > %s)",
                [to_ms(now)],
            )
            policy = await _one(conn, "SELECT COALESCE(MAX(version), 0) AS v FROM policies")
        return StatusCounts(
            agents_enrolled=int(agents["n"]) if agents else 0,
            requests=requests,
            grants=grants,
            revokes_unacknowledged=grants.get("REVOKING", 0),
            commands_unacknowledged=int(agents["unacked"]) if agents else 0,
            locks_in_force=int(locks["n"]) if locks else 0,
            policy_version=int(policy["v"]) if policy else 0,
        )

    async def live_grants(self, agent: str) -> list[Grant]:
        async with self._read() as conn:
            return await _live_grants(conn, agent)

    async def get_agent(self, name: str) -> Agent | None:
        async with self._read() as conn:
            return await _get_agent(conn, name)

    async def list_agents(self) -> list[Agent]:
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.removed_at IS NULL ORDER BY a.name",
            )
        return [rec.agent(r) for r in rows]

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        async with self._read() as conn:
            return await _agent_for_credential(conn, credential_hash)

    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None:
        async with self._read() as conn:
            row = await _one(
                conn,
                "SELECT u.name, u.groups, t.scopes "
                "FROM tokens t JOIN users u ON u.name = t.user_name "
                "WHERE t.hash = %s AND t.revoked_at IS NULL AND u.disabled = 0 "
                "AND (t.expires_at IS NULL OR t.expires_at > %s)",
                [token_hash, to_ms(now)],
            )
        if row is None:
            return None
        return rec.token_principal(row)

    async def list_tokens(self, user: str) -> list[TokenInfo]:
        async with self._read() as conn:
            rows = await _all(
                conn,
                "SELECT hash, user_name, label, created_at, expires_at, revoked_at, scopes "
                "FROM tokens "
                "WHERE %s = '' OR user_name = %s ORDER BY created_at, hash",
                [user, user],
            )
        return [rec.token(r) for r in rows]

    async def list_join_tokens(self) -> list[JoinTokenInfo]:
        async with self._read() as conn:
            tokens = await _all(
                conn,
                f"SELECT {rec.ENROLLMENT_COLUMNS} FROM join_tokens ORDER BY created_at, hash",
            )
            agents = await _all(
                conn,
                "SELECT name, join_token_id FROM agents "
                "WHERE removed_at IS NULL AND join_token_id <> ''",
            )
        used: dict[str, list[str]] = {}
        for a in agents:
            used.setdefault(a["join_token_id"], []).append(a["name"])
        return [rec.join_token_info(t, used.get(t["id"], ())) for t in tokens]

    async def get_user(self, name: str) -> UserInfo | None:
        async with self._read() as conn:
            row = await _one(
                conn,
                "SELECT name, groups, disabled, created_at, managed_by FROM users WHERE name = %s",
                [name],
            )
        return None if row is None else rec.user(row)

    async def principal_for_user(self, name: str, serial: str) -> Principal | None:
        async with self._read() as conn:
            row = await _one(
                conn,
                "SELECT name, groups FROM users WHERE name = %s AND disabled = 0 "
                "AND NOT EXISTS (SELECT 1 FROM revoked_certificates WHERE serial = %s)",
                [name, serial],
            )
        if row is None:
            return None
        return Principal(name=row["name"], groups=frozenset(json.loads(row["groups"])))

    async def user_groups(self, name: str) -> frozenset[str] | None:
        async with self._read() as conn:
            return await _user_groups(conn, name)

    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]:
        async with self._read() as conn:
            rows = await _all(conn, _COMMANDS_AFTER, [agent, seq, limit])
        return [rec.command(r, agent) for r in rows]

    async def first_unacked_seq(self, agent: str) -> int | None:
        async with self._read() as conn:
            row = await _one(
                conn,
                # A snapshot's own row is never resent (as in the SQLite store).
                "SELECT MIN(seq) AS seq FROM commands WHERE agent = %s AND acked_at IS NULL "
                "AND kind <> 'snapshot'",
                [agent],
            )
        return None if row is None or row["seq"] is None else int(row["seq"])

    async def policy_version(self) -> int:
        """The newest policy version (0: none)."""
        async with self._read() as conn:
            row = await _one(conn, "SELECT COALESCE(MAX(version), 0) AS v FROM policies")
        return 0 if row is None else int(row["v"])

    async def current_policy(self) -> PolicyDocument | None:
        async with self._read() as conn:
            row = await _one(
                conn,
                "SELECT yaml, version, sha256, applied_at, applied_by FROM policies "
                "ORDER BY version DESC LIMIT 1",
            )
        return None if row is None else rec.policy(row)

    async def list_audit(
        self, *, since: datetime | None, agent: str, subject: str, kind: str, grant_id: str,
        request_id: str, after_seq: int, limit: int,
    ) -> list[AuditEvent]:  # fmt: skip
        where, args = _filters(
            [("agent", agent), ("subject", subject), ("kind", kind), ("grant_id", grant_id),
             ("request_id", request_id)]
        )  # fmt: skip
        where.append("seq > %s")
        args.append(after_seq)
        if since is not None:
            where.append("at >= %s")
            args.append(to_ms(since))
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where)} "
                "ORDER BY seq LIMIT %s",
                [*args, limit],
            )
        return [rec.audit(r) for r in rows]

    async def due_scheduled(self, now: datetime, limit: int) -> list[Request]:
        """SCHEDULED requests whose start has come, earliest first."""
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'SCHEDULED' "
                "AND r.start_at <= %s ORDER BY r.start_at LIMIT %s",
                [to_ms(now), limit],
            )
            reviews = await _reviews(conn, [r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def requests_changed_after(self, after_seq: int, limit: int) -> list[tuple[str, int]]:
        """(request id, its latest audit seq) for requests with audit events after
        `after_seq`, in the order of those latest changes; with `after_seq` negative, only the
        head: [("", head seq)] (as in the SQLite store)."""
        async with self._read() as conn:
            if after_seq < 0:
                row = await _one(conn, "SELECT seq FROM audit_head WHERE id = 1")
                return [("", int(row["seq"]) if row else 0)]
            rows = await _all(
                conn,
                "SELECT request_id, MAX(seq) AS last FROM audit WHERE seq > %s "
                "AND request_id <> '' GROUP BY request_id ORDER BY last LIMIT %s",
                [after_seq, limit],
            )
        return [(r["request_id"], int(r["last"])) for r in rows]

    async def audit_chain(self, after_seq: int, limit: int) -> list[AuditEvent]:
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > %s ORDER BY seq LIMIT %s",
                [after_seq, limit],
            )
        return [rec.audit(r) for r in rows]

    async def next_deadline(self) -> datetime | None:
        async with self._read() as conn:
            row = await _one(
                conn,
                "SELECT LEAST((SELECT MIN(not_after) FROM grants "
                "WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING')), "
                "(SELECT MIN(pending_expires_at) FROM requests WHERE state = 'PENDING'), "
                "(SELECT MIN(start_at) FROM requests WHERE state = 'SCHEDULED')) AS t",
            )
        return None if row is None or row["t"] is None else from_ms(int(row["t"]))

    async def get_meta(self, key: str) -> str | None:
        async with self._read() as conn:
            return await _get_meta(conn, key)

    async def list_locks(self, *, include_ended: bool, now: datetime) -> list[Lock]:
        sql = f"SELECT {_LOCK_COLUMNS} FROM locks"
        args: list[Any] = []
        if not include_ended:
            sql += " WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > %s)"
            args.append(to_ms(now))
        async with self._read() as conn:
            rows = await _all(conn, sql + " ORDER BY created_at DESC, id DESC LIMIT 1000", args)
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
            mark="%s",
        )
        async with self._read() as conn:
            rows = await _all(
                conn,
                f"SELECT {_BREAKGLASS_COLUMNS} FROM breakglass_codes WHERE {where} "
                "ORDER BY issued_at DESC, id DESC LIMIT 1000",
                args,
            )
        return [rec.breakglass_code(r) for r in rows]

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        async with self._read() as conn:
            return await _lock_in_force(conn, subject, agent, action, now)


async def _newest_first(
    conn: Conn,
    select: str,
    alias: str,
    filters: list[tuple[str, Any]],
    page_token: str,
    limit: int,
) -> tuple[list[dict[str, Any]], bool]:
    where, args = _filters(filters)
    after = rec.page(page_token)
    if after:
        where.append(f"({alias}created_at, {alias}id) < (%s, %s)")
        args.extend(after)
    sql = select + (" WHERE " + " AND ".join(where) if where else "")
    order = f" ORDER BY {alias}created_at DESC, {alias}id DESC LIMIT %s"
    rows = await _all(conn, sql + order, [*args, limit + 1])
    return rows[:limit], len(rows) > limit


def _filters(pairs: list[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in pairs:
        if isinstance(value, list):
            if value:
                where.append(f"{column} = ANY(%s)")
                args.append(value)
        elif value:
            where.append(f"{column} = %s")
            args.append(value)
    return where, args


class PostgresOutbox:
    """The sender's side of the outbox (as `SqliteOutbox`): each method its own short
    transaction. Senders on several replicas share the work: routing moves one cursor by
    compare-and-set, and deliveries are claimed with FOR UPDATE SKIP LOCKED."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def list_receivers(self) -> list[ReceiverSpec]:
        async with self._store._read() as conn:
            rows = await _all(
                conn,
                "SELECT name, kind, settings, secret, route, created_at, created_by "
                "FROM receivers ORDER BY name",
            )
        return [
            ReceiverSpec(
                r["name"], ReceiverKind(r["kind"]), json.loads(r["settings"]), r["secret"],
                rec.route(r["route"]), from_ms(r["created_at"]), r["created_by"],
            )
            for r in rows
        ]  # fmt: skip

    async def unrouted(self, limit: int) -> tuple[int, list[tuple[int, Notice]]]:
        cursor = int(await self._store.get_meta(rec.OUTBOX_CURSOR) or "0")
        async with self._store._read() as conn:
            cur = await conn.execute(
                f"SELECT seq, {rec.OUTBOX_COLUMNS} FROM outbox WHERE seq > %s "
                "ORDER BY seq LIMIT %s",
                [cursor, limit],
                prepare=False,
            )
            rows = [tuple(r.values()) for r in await cur.fetchall()]
        return cursor, [(int(r[0]), rec.notice(r[1:])) for r in rows]

    async def route(
        self, cursor: int, upto: int, deliveries: Sequence[tuple[int, str]], now: datetime
    ) -> bool:
        async with self._store.transaction() as tx:
            conn = tx._conn
            current = await _one(
                conn, "SELECT value FROM meta WHERE key = %s FOR UPDATE", [rec.OUTBOX_CURSOR]
            )
            if int(current["value"] if current else "0") != cursor:
                return False
            if deliveries:
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO deliveries (event_seq, receiver, state, next_at) "
                        "VALUES (%s, %s, 'PENDING', %s) ON CONFLICT DO NOTHING",
                        [(seq, name, to_ms(now)) for seq, name in deliveries],
                    )
            await tx.set_meta(rec.OUTBOX_CURSOR, str(upto))
        return True

    async def claim(self, now: datetime, until: datetime, limit: int) -> list[Delivery]:
        async with self._store.transaction() as tx:
            rows = await _all(
                tx._conn,
                "UPDATE deliveries SET claimed_until = %s WHERE (event_seq, receiver) IN "
                "(SELECT event_seq, receiver FROM deliveries WHERE state = 'PENDING' "
                "AND next_at <= %s AND claimed_until <= %s ORDER BY next_at LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING event_seq, receiver, attempts",
                [to_ms(until), to_ms(now), to_ms(now), limit],
            )
            if not rows:
                return []
            seqs = sorted({int(r["event_seq"]) for r in rows})
            cur = await tx._conn.execute(
                f"SELECT seq, {rec.OUTBOX_COLUMNS} FROM outbox WHERE seq = ANY(%s)", [seqs]
            )
            notices = {
                int(v[0]): rec.notice(v[1:])
                for v in (tuple(r.values()) for r in await cur.fetchall())
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
        attempt = delivery.attempts + 1
        if ok:
            state, due = DeliveryState.DELIVERED, to_ms(at)
        elif next_at is None:
            state, due = DeliveryState.GAVE_UP, to_ms(at)
        else:
            state, due = DeliveryState.PENDING, to_ms(next_at)
        async with self._store.transaction() as tx:
            await tx._conn.execute(
                "UPDATE deliveries SET state = %s, attempts = %s, next_at = %s, "
                "claimed_until = 0, last_error = %s, delivered_at = %s "
                "WHERE event_seq = %s AND receiver = %s AND state = 'PENDING'",
                [
                    state.value, attempt, due, "" if ok else detail, to_ms(at) if ok else None,
                    delivery.event_seq, delivery.receiver,
                ],
            )  # fmt: skip
            await tx._conn.execute(
                "INSERT INTO delivery_attempts (event_seq, receiver, attempt, at, ok, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [delivery.event_seq, delivery.receiver, attempt, to_ms(at), int(ok), detail],
            )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        async with self._store.transaction() as tx, tx._conn.cursor() as c:
            await c.executemany(
                "UPDATE deliveries SET claimed_until = 0 WHERE event_seq = %s "
                "AND receiver = %s AND state = 'PENDING'",
                [(d.event_seq, d.receiver) for d in deliveries],
            )

    async def prune(self, before: datetime) -> int:
        async with self._store.transaction() as tx:
            cursor = await _one(
                tx._conn, "SELECT value FROM meta WHERE key = %s", [rec.OUTBOX_CURSOR]
            )
            upto = int(cursor["value"]) if cursor else 0
            rows = await _all(
                tx._conn,
                "SELECT seq FROM outbox o WHERE o.at < %s AND o.seq <= %s AND NOT EXISTS "
                "(SELECT 1 FROM deliveries d WHERE d.event_seq = o.seq AND d.state = 'PENDING') "
                "ORDER BY seq LIMIT 5000",
                [to_ms(before), upto],
            )
            seqs = [int(r["seq"]) for r in rows]
            if seqs:
                for table, column in (
                    ("delivery_attempts", "event_seq"),
                    ("deliveries", "event_seq"),
                    ("outbox", "seq"),
                ):
                    await tx._conn.execute(f"DELETE FROM {table} WHERE {column} = ANY(%s)", [seqs])
        return len(seqs)

    async def next_due(self) -> datetime | None:
        async with self._store._read() as conn:
            row = await _one(
                conn,
                "SELECT MIN(GREATEST(next_at, claimed_until)) AS t FROM deliveries "
                "WHERE state = 'PENDING'",
            )
        return from_ms(row["t"]) if row and row["t"] is not None else None

    async def deliveries(
        self, *, receiver: str, states: Sequence[DeliveryState], limit: int, before: int
    ) -> list[DeliveryRecord]:
        where: list[str] = ["true"]
        args: list[Any] = []
        if receiver:
            where.append("d.receiver = %s")
            args.append(receiver)
        if states:
            where.append("d.state = ANY(%s)")
            args.append([s.value for s in states])
        if before:
            where.append("d.event_seq < %s")
            args.append(before)
        async with self._store._read() as conn:
            rows = await _all(
                conn,
                "SELECT d.event_seq, o.event_id, o.kind, d.receiver, d.state, d.attempts, "
                "(SELECT MAX(a.at) FROM delivery_attempts a WHERE a.event_seq = d.event_seq "
                "AND a.receiver = d.receiver) AS last_at, d.next_at, d.last_error, "
                "o.request_id, o.grant_id FROM deliveries d JOIN outbox o ON o.seq = d.event_seq "
                f"WHERE {' AND '.join(where)} ORDER BY d.event_seq DESC, d.receiver LIMIT %s",
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
        where, args = ["true"], []
        if request_id:
            where.append("o.request_id = %s")
            args.append(request_id)
        if receiver:
            where.append("a.receiver = %s")
            args.append(receiver)
        async with self._store._read() as conn:
            rows = await _all(
                conn,
                "SELECT a.event_seq, o.event_id, o.kind, a.receiver, a.attempt, a.at, a.ok, "
                "a.detail, COALESCE(d.state, 'GAVE_UP') AS state FROM delivery_attempts a "
                "JOIN outbox o ON o.seq = a.event_seq "
                "LEFT JOIN deliveries d ON d.event_seq = a.event_seq AND d.receiver = a.receiver "
                f"WHERE {' AND '.join(where)} ORDER BY a.id DESC LIMIT %s",
                [*args, limit],
            )
        return [
            AttemptRecord(
                int(r["event_seq"]), r["event_id"], r["kind"], r["receiver"], int(r["attempt"]),
                from_ms(r["at"]), bool(r["ok"]), r["detail"], DeliveryState(r["state"]),
            )
            for r in rows
        ]  # fmt: skip


from .importer import import_sqlite  # noqa: E402  (uses `migrate` above)

__all__ = [
    "PostgresOutbox",
    "PostgresStore",
    "PostgresTx",
    "import_sqlite",
    "migrate",
    "with_schema",
]
