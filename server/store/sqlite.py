"""The SQLite store (aiosqlite, WAL): the only SQL of the coordinator.

One connection writes, under an asyncio lock, one `BEGIN IMMEDIATE` transaction at a time; a
second connection reads committed data without waiting for the writer (WAL). Schema migrations
are versioned SQL files applied with yoyo before the store opens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from yoyo import get_backend, read_migrations

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

_REQUEST_COLUMNS = rec.columns(rec.REQUEST_COLUMNS, "r.") + ", g.state AS grant_state"
_REQUEST_FROM = "requests r LEFT JOIN grants g ON g.id = r.grant_id"
_GRANT_COLUMNS = rec.columns(rec.GRANT_COLUMNS)
_GRANT_COLUMNS_OF_G = rec.columns(rec.GRANT_COLUMNS, "g.")
_GRANT_COLUMNS_G = ", ".join(f"g.{c} AS g_{c}" for c in rec.GRANT_COLUMNS)
_AUDIT_COLUMNS = rec.columns(rec.AUDIT_COLUMNS)
_LIVE_IN = ", ".join(f"'{s}'" for s in rec.LIVE_STATES)
_AGENT_COLUMNS = (
    "a.name, a.labels, a.enrolled_at, a.last_seen_at, a.version, a.last_acked_seq, a.last_seq, "
    "a.replica, "
    f"(SELECT COUNT(*) FROM grants g WHERE g.agent = a.name AND g.state IN ({_LIVE_IN})) "
    "AS live_grants"
)


T = TypeVar("T")


async def _to_the_end(statement: Awaitable[T]) -> T:
    """Await `statement` to its end even if this task is cancelled meanwhile; a cancellation
    that arrived is raised afterwards."""
    task = asyncio.ensure_future(statement)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


def migrate(path: Path) -> None:
    """Bring the database at `path` to the newest schema (synchronous; run before opening)."""
    backend = get_backend(f"sqlite:///{path}")
    with backend.lock():
        backend.apply_migrations(backend.to_apply(read_migrations(str(MIGRATIONS))))


# aiosqlite runs each statement on the connection's own worker thread, so a slow disk never
# stalls the event loop. Measured alternative (docs/performance.md): calling sqlite3 inline on
# the loop thread gave about 1.7x the request throughput; aiosqlite is kept as the project's
# fixed choice until that trade is decided.
Connection = aiosqlite.Connection


async def _connect(path: Path) -> Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=5000",
        "PRAGMA cache_size=-65536",
        # Checkpoints copy the WAL back into the database and sync it: SqliteStore runs them on
        # a separate worker thread every CHECKPOINT_EVERY commits, never inside a transaction.
        "PRAGMA wal_autocheckpoint=0",
    ):
        await db.execute(pragma)
    return db


def _checkpoint(path: Path) -> None:
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            # PASSIVE: copies what no reader still needs, never waits for readers or the writer.
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()
    except sqlite3.Error as exc:
        # The WAL only grows until the next checkpoint succeeds; nothing is lost.
        log.warning("WAL checkpoint failed: %s", exc)


# Each read is one call on the connection's thread (execute and fetch all rows together), never
# a cursor held open across awaits: an open statement holds the connection's read snapshot, and
# another coroutine's read on the same connection in between would see that older snapshot
# (a request committed a moment ago reads back as missing). One thread hop instead of three, too.
async def _one(conn: Connection, sql: str, args: Iterable[Any] = ()) -> Any:
    rows = await conn.execute_fetchall(sql, tuple(args))
    return next(iter(rows), None)


async def _all(conn: Connection, sql: str, args: Iterable[Any] = ()) -> list[Any]:
    return list(await conn.execute_fetchall(sql, tuple(args)))


async def _recent_auto_grants(
    conn: Connection, subject: str, rule: str, since: datetime
) -> list[tuple[datetime, datetime, datetime | None]]:
    rows = await _all(
        conn,
        "SELECT g.not_before, g.not_after, g.ended_at FROM requests r "
        "JOIN grants g ON g.id = r.grant_id WHERE r.created_at > ? AND r.subject = ? "
        "AND r.rule = ? AND r.decided_by LIKE 'policy:%'",
        [to_ms(since), subject, rule],
    )
    return [
        (from_ms(r["not_before"]), from_ms(r["not_after"]), rec.at(r["ended_at"])) for r in rows
    ]


async def _get_request(conn: Connection, request_id: str) -> Request | None:
    row = await _one(
        conn, f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.id = ?", [request_id]
    )
    if row is None:
        return None
    reviews = await _reviews(conn, [request_id])
    return rec.request(row, reviews.get(request_id, ()))


async def _reviews(conn: Connection, ids: list[str]) -> dict[str, tuple[Review, ...]]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = await _all(
        conn,
        f"SELECT {rec.REVIEW_COLUMNS} FROM reviews "
        f"WHERE request_id IN ({marks}) ORDER BY reviewed_at, reviewer",
        ids,
    )
    return rec.reviews_by_request(rows)


async def _get_grant(conn: Connection, grant_id: str) -> Grant | None:
    row = await _one(conn, f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = ?", [grant_id])
    return None if row is None else rec.grant(row)


async def _get_agent(conn: Connection, name: str) -> Agent | None:
    row = await _one(
        conn,
        f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.name = ? AND a.removed_at IS NULL",
        [name],
    )
    return None if row is None else rec.agent(row)


_LOCK_COLUMNS = rec.columns(rec.LOCK_COLUMNS)
_COMMANDS_AFTER = rec.commands_after_sql("?")
_BREAKGLASS_COLUMNS = rec.columns(rec.BREAKGLASS_COLUMNS)
_CHECKPOINT_COLUMNS = "seq, hash, at, key_id, signature"


async def _audit_head(conn: Connection) -> tuple[int, str]:
    row = await _one(conn, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    return (0, GENESIS) if row is None else (int(row["seq"]), str(row["hash"]))


async def _live_grants(conn: Connection, agent: str) -> list[Grant]:
    rows = await _all(
        conn,
        f"SELECT {_GRANT_COLUMNS} FROM grants WHERE agent = ? "
        "AND state IN ('PENDING_DELIVERY', 'ACTIVE') ORDER BY grant_seq",
        [agent],
    )
    return [rec.grant(r) for r in rows]


async def _agent_for_credential(conn: Connection, credential_hash: str) -> str | None:
    row = await _one(
        conn,
        "SELECT name FROM agents WHERE credential_hash = ? AND removed_at IS NULL",
        [credential_hash],
    )
    return None if row is None else str(row["name"])


async def _user_groups(conn: Connection, name: str) -> frozenset[str] | None:
    row = await _one(conn, "SELECT groups FROM users WHERE name = ?", [name])
    return None if row is None else frozenset(json.loads(row["groups"]))


async def _get_meta(conn: Connection, key: str) -> str | None:
    row = await _one(conn, "SELECT value FROM meta WHERE key = ?", [key])
    return None if row is None else str(row["value"])


def _lock_match(target: LockTarget, alias: str) -> tuple[str, list[str]]:
    """SQL conditions (each starting with AND) for rows a lock target matches. Lock subjects are
    stored case-folded (subjects are ASCII, so SQL lower() folds them the same way)."""
    where = ""
    args: list[str] = []
    if target.subject:
        where += f" AND lower({alias}subject) = ?"
        args.append(target.subject)
    if target.agent:
        where += f" AND {alias}agent = ?"
        args.append(target.agent)
    if target.action:
        where += f" AND {alias}action = ?"
        args.append(target.action)
    return where, args


async def _lock_in_force(
    conn: Connection, subject: str, agent: str, action: str, now: datetime
) -> Lock | None:
    row = await _one(
        conn,
        f"SELECT {_LOCK_COLUMNS} FROM locks WHERE lifted_at IS NULL "
        "AND (expires_at IS NULL OR expires_at > ?) AND subject IN ('', ?) "
        "AND agent IN ('', ?) AND action IN ('', ?) ORDER BY created_at, id LIMIT 1",
        [to_ms(now), subject.lower(), agent, action],
    )
    return None if row is None else rec.lock(row)


_REQUEST_INSERT = (
    f"INSERT INTO requests ({rec.columns(rec.REQUEST_COLUMNS)}) "
    f"VALUES ({','.join('?' * len(rec.REQUEST_COLUMNS))})"
)
_GRANT_INSERT = (
    f"INSERT INTO grants ({_GRANT_COLUMNS}) VALUES ({','.join('?' * len(rec.GRANT_COLUMNS))})"
)
_COMMAND_INSERT = (
    "INSERT INTO commands (agent, seq, kind, grant_id, revoke_reason, created_at) "
    "VALUES (?,?,?,?,?,?)"
)


class SqliteTx:
    """One write transaction. Methods that change state by compare-and-set return False when the
    row was not in the expected state, so the caller decides what that means."""

    def __init__(self, store: SqliteStore, conn: Connection) -> None:
        self._store = store
        self._conn = conn
        # The audit chain's head, read from the database at this transaction's first audit
        # event (under the write lock, so no other writer moves it meanwhile).
        self._head: tuple[int, str] | None = None
        self.new_audit: list[AuditEvent] = []

    async def _audit_head(self) -> tuple[int, str]:
        if self._head is None:
            self._head = await _audit_head(self._conn)
        return self._head

    async def live_grants(self, agent: str) -> list[Grant]:
        return await _live_grants(self._conn, agent)

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        return await _agent_for_credential(self._conn, credential_hash)

    async def user_groups(self, name: str) -> frozenset[str] | None:
        return await _user_groups(self._conn, name)

    async def get_meta(self, key: str) -> str | None:
        return await _get_meta(self._conn, key)

    async def get_request(self, request_id: str) -> Request | None:
        return await _get_request(self._conn, request_id)

    async def get_grant(self, grant_id: str) -> Grant | None:
        return await _get_grant(self._conn, grant_id)

    async def get_agent(self, name: str) -> Agent | None:
        return await _get_agent(self._conn, name)

    async def insert_request(self, r: Request) -> None:
        await self._conn.execute(_REQUEST_INSERT, rec.request_values(r))

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
        cur = await self._conn.execute(
            "UPDATE requests SET state = ?, decided_at = ?, decided_by = ?, decision_reason = ?, "
            "grant_id = ? WHERE id = ? AND state = ?",
            (state.value, to_ms(at), by, reason, grant_id, request_id, expected.value),
        )
        return cur.rowcount == 1

    async def set_request_grants(self, request_id: str, grant_ids: Sequence[str]) -> None:
        """The grants a request for several agents made (its `grant_id` is the first)."""
        await self._conn.execute(
            "UPDATE requests SET grant_ids = ? WHERE id = ?",
            (json.dumps(list(grant_ids)), request_id),
        )

    async def list_agents(self) -> list[Agent]:
        rows = await _all(
            self._conn,
            f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.removed_at IS NULL ORDER BY a.name",
        )
        return [rec.agent(r) for r in rows]

    async def insert_review(self, request_id: str, review: Review) -> bool:
        """False when this reviewer has reviewed the request already."""
        cur = await self._conn.execute(
            "INSERT INTO reviews (request_id, reviewer, decision, reason, reviewed_at, "
            "groups) VALUES (?,?,?,?,?,?) ON CONFLICT (request_id, reviewer) DO NOTHING",
            (request_id, review.reviewer, review.decision.value, review.reason,
             to_ms(review.reviewed_at), json.dumps(list(review.groups))),
        )  # fmt: skip
        return cur.rowcount == 1

    async def insert_grant(self, g: Grant) -> None:
        await self._conn.execute(_GRANT_INSERT, rec.grant_values(g))

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
        sets, args = _grant_sets(expected, state, change)
        marks = ",".join("?" * len(states))
        cur = await self._conn.execute(
            f"UPDATE grants SET {sets} WHERE id = ? AND state IN ({marks})",
            (*args, grant_id, *states),
        )
        return cur.rowcount == 1

    async def append_command(
        self, agent: str, kind: CommandKind, grant_id: str, at: datetime, revoke_reason: str = ""
    ) -> int:
        """Give the command the agent's next sequence number (gap-free) and store it."""
        row = await _one(
            self._conn,
            "UPDATE agents SET last_seq = last_seq + 1 WHERE name = ? AND removed_at IS NULL "
            "RETURNING last_seq",
            [agent],
        )
        if row is None:
            raise Conflict(f"agent {agent} is not enrolled")
        seq = int(row["last_seq"])
        await self._conn.execute(
            _COMMAND_INSERT, (agent, seq, kind.value, grant_id, revoke_reason, to_ms(at))
        )
        if kind in (CommandKind.GRANT, CommandKind.REVOKE):
            column = "grant_seq" if kind is CommandKind.GRANT else "revoke_seq"
            await self._conn.execute(
                f"UPDATE grants SET {column} = ? WHERE id = ?", (seq, grant_id)
            )
        return seq

    async def supersede_commands(self, agent: str, snapshot_seq: int, at: datetime) -> int:
        """Mark the agent's commands before `snapshot_seq` that were never acknowledged as
        replaced by that snapshot (NOT_APPLIED): they are not sent again."""
        cur = await self._conn.execute(
            "UPDATE commands SET acked_at = ?, ack_status = 'NOT_APPLIED', ack_reason = ? "
            "WHERE agent = ? AND seq < ? AND acked_at IS NULL",
            (to_ms(at), f"replaced by snapshot {snapshot_seq}", agent, snapshot_seq),
        )
        return cur.rowcount

    async def extend_grant(
        self, grant_id: str, *, expected_not_after: datetime, not_after: datetime
    ) -> bool:
        """Compare-and-set a live grant's end to a later `not_after` (in place: same grant),
        counting the extension and keeping the first end. False when the grant is no longer
        PENDING_DELIVERY or ACTIVE or its end moved meanwhile."""
        cur = await self._conn.execute(
            "UPDATE grants SET not_after = ?, extensions = extensions + 1, "
            "original_not_after = COALESCE(original_not_after, not_after) "
            "WHERE id = ? AND state IN ('PENDING_DELIVERY', 'ACTIVE') AND not_after = ?",
            (to_ms(not_after), grant_id, to_ms(expected_not_after)),
        )
        return cur.rowcount == 1

    async def insert_requests(self, requests: Sequence[Request]) -> None:
        """`insert_request` for many requests, one statement for all (group commit)."""
        await self._conn.executemany(_REQUEST_INSERT, [rec.request_values(r) for r in requests])

    async def insert_grants(self, grants: Sequence[Grant]) -> None:
        """`insert_grant` for many grants, one statement for all (group commit)."""
        await self._conn.executemany(_GRANT_INSERT, [rec.grant_values(g) for g in grants])

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
        # One statement moves every agent's counter by its number of new commands.
        rows = await _all(
            self._conn,
            "UPDATE agents SET last_seq = last_seq + w.value FROM json_each(?) AS w "
            "WHERE agents.name = w.key AND agents.removed_at IS NULL "
            "RETURNING agents.name, agents.last_seq",
            [json.dumps(wanted)],
        )
        next_seq = {name: last - wanted[name] + 1 for name, last in rows}
        seqs: list[int | None] = []
        stored: list[tuple[Any, ...]] = []
        for agent, kind, grant_id, at in commands:
            seq = next_seq.get(agent)
            seqs.append(seq)
            if seq is not None:
                next_seq[agent] = seq + 1
                stored.append((agent, seq, kind.value, grant_id, revoke_reason, to_ms(at)))
        await self._conn.executemany(_COMMAND_INSERT, stored)
        return seqs

    async def ack_commands(
        self, acks: Sequence[tuple[str, int, str, str]], at: datetime
    ) -> dict[tuple[str, int], tuple[CommandKind, str, datetime]]:
        """Record agents' acks (agent, seq, status, reason), each command's first ack only (and
        a revoke's APPLIED after a failed one), in a few statements per chunk. Returns, for each
        ack recorded now (not for unknown or repeated ones, nor for another agent's command),
        its command's kind, grant and creation time; moves each agent's last_acked_seq up."""
        done: dict[tuple[str, int], tuple[CommandKind, str, datetime]] = {}
        when = to_ms(at)
        for first in range(0, len(acks), _CHUNK):
            chunk = acks[first : first + _CHUNK]
            rows = await _all(
                self._conn,
                "UPDATE commands SET acked_at = ?, ack_status = a.column3, ack_reason = a.column4 "
                f"FROM (VALUES {','.join(['(?,?,?,?)'] * len(chunk))}) AS a "
                "WHERE commands.agent = a.column1 AND commands.seq = a.column2 "
                # The first ack counts; except that a revoke the agent could not carry out and
                # later did (sent again after its restart) is acked again as done.
                "AND (commands.acked_at IS NULL OR (commands.kind = 'revoke' "
                "AND commands.ack_status <> 'APPLIED' AND a.column3 = 'APPLIED')) "
                "RETURNING commands.agent, commands.seq, commands.kind, commands.grant_id, "
                "commands.created_at",
                [when, *(v for ack in chunk for v in ack)],
            )
            for agent, seq, kind, grant_id, created in rows:
                done[(agent, int(seq))] = (CommandKind(kind), grant_id, from_ms(created))
        highest: dict[str, int] = {}
        for agent, seq in done:
            highest[agent] = max(seq, highest.get(agent, 0))
        await self._conn.executemany(
            "UPDATE agents SET last_acked_seq = MAX(last_acked_seq, ?), last_seen_at = ? "
            "WHERE name = ?",
            [(seq, when, agent) for agent, seq in highest.items()],
        )
        return done

    async def get_grants(self, grant_ids: Sequence[str]) -> dict[str, Grant]:
        found: dict[str, Grant] = {}
        for first in range(0, len(grant_ids), _CHUNK):
            chunk = grant_ids[first : first + _CHUNK]
            rows = await _all(
                self._conn,
                f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            found.update((r["id"], rec.grant(r)) for r in rows)
        return found

    # Locks.

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        # One writer at a time (BEGIN IMMEDIATE): nothing else commits until this one does.
        return await _recent_auto_grants(self._conn, subject, rule, since)

    async def insert_breakglass_codes(self, codes: Sequence[tuple[BreakglassCode, str]]) -> None:
        await self._conn.executemany(
            f"INSERT INTO breakglass_codes ({_BREAKGLASS_COLUMNS}) "
            f"VALUES ({','.join('?' * len(rec.BREAKGLASS_COLUMNS))})",
            [rec.breakglass_values(code, digest) for code, digest in codes],
        )

    async def get_breakglass_code(self, code_id: str) -> BreakglassCode | None:
        row = await _one(
            self._conn,
            f"SELECT {_BREAKGLASS_COLUMNS} FROM breakglass_codes WHERE id = ?",
            [code_id],
        )
        return None if row is None else rec.breakglass_code(row)

    async def mark_breakglass_used(
        self, code_id: str, *, used_at: datetime, grant_id: str, used_by: str
    ) -> bool:
        cur = await self._conn.execute(
            "UPDATE breakglass_codes SET used_at = ?, grant_id = ?, used_by = ? "
            "WHERE id = ? AND used_at IS NULL",
            (to_ms(used_at), grant_id, used_by, code_id),
        )
        return cur.rowcount == 1

    async def review_breakglass(self, code_id: str, *, at: datetime, by: str, note: str) -> bool:
        cur = await self._conn.execute(
            "UPDATE breakglass_codes SET reviewed_at = ?, reviewed_by = ?, review_note = ? "
            "WHERE id = ? AND used_at IS NOT NULL AND reviewed_at IS NULL",
            (to_ms(at), by, note, code_id),
        )
        return cur.rowcount == 1

    async def insert_lock(self, lock: Lock) -> None:
        t = lock.target
        await self._conn.execute(
            f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                lock.id, t.subject, t.agent, t.action, lock.reason, lock.created_by,
                to_ms(lock.created_at), rec.ms(lock.expires_at), None, "", "",
            ),
        )  # fmt: skip

    async def lift_lock(self, lock_id: str, at: datetime, by: str, reason: str) -> bool:
        cur = await self._conn.execute(
            "UPDATE locks SET lifted_at = ?, lifted_by = ?, lift_reason = ? "
            "WHERE id = ? AND lifted_at IS NULL",
            (to_ms(at), by, reason, lock_id),
        )
        return cur.rowcount == 1

    async def get_lock(self, lock_id: str) -> Lock | None:
        row = await _one(self._conn, f"SELECT {_LOCK_COLUMNS} FROM locks WHERE id = ?", [lock_id])
        return None if row is None else rec.lock(row)

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        return await _lock_in_force(self._conn, subject, agent, action, now)

    async def locks_in_force(self, now: datetime) -> list[Lock]:
        rows = await _all(
            self._conn,
            f"SELECT {_LOCK_COLUMNS} FROM locks WHERE lifted_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, id",
            [to_ms(now)],
        )
        return [rec.lock(r) for r in rows]

    async def locked_grants(self, target: LockTarget, states: Iterable[GrantState]) -> list[Grant]:
        """Grants in `states` that the target matches, on agents still enrolled, per agent in
        the order they were granted."""
        where, args = _lock_match(target, "g.")
        wanted = [s.value for s in states]
        rows = await _all(
            self._conn,
            f"SELECT {_GRANT_COLUMNS_OF_G} FROM grants g JOIN agents a ON a.name = g.agent "
            f"WHERE a.removed_at IS NULL AND g.state IN ({','.join('?' * len(wanted))}) {where} "
            "ORDER BY g.agent, g.grant_seq",
            [*wanted, *args],
        )
        return [rec.grant(r) for r in rows]

    async def pending_requests(self) -> list[Request]:
        """Every PENDING request, oldest first (a new policy judges them all)."""
        rows = await _all(
            self._conn,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'PENDING' "
            "ORDER BY r.created_at, r.id",
        )
        reviews = await _reviews(self._conn, [r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def locked_requests(self, target: LockTarget) -> list[Request]:
        """Pending requests the target matches."""
        where, args = _lock_match(target, "r.")
        rows = await _all(
            self._conn,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'PENDING' {where} "
            "ORDER BY r.created_at, r.id",
            args,
        )
        reviews = await _reviews(self._conn, [r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

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
        await self._conn.executemany(
            "UPDATE grants SET revoke_seq = ? WHERE id = ?", [(q, g) for g, q in by_grant.items()]
        )
        return by_grant

    async def enroll_agent(
        self, name: str, labels: dict[str, str], credential_hash: str, at: datetime,
        join_token_id: str = "",
    ) -> bool:  # fmt: skip
        """Create the agent, or give an existing one a new credential. True when it is new."""
        cur = await self._conn.execute(
            "UPDATE agents SET labels = ?, credential_hash = ?, removed_at = NULL, "
            "join_token_id = ? WHERE name = ?",
            (json.dumps(labels, sort_keys=True), credential_hash, join_token_id, name),
        )
        if cur.rowcount == 1:
            return False
        await self._conn.execute(
            "INSERT INTO agents (name, labels, credential_hash, enrolled_at, join_token_id) "
            "VALUES (?,?,?,?,?)",
            (name, json.dumps(labels, sort_keys=True), credential_hash, to_ms(at), join_token_id),
        )
        return True

    async def agent_seen(
        self, name: str, at: datetime, *, labels: dict[str, str] | None = None,
        version: str | None = None, boot_id: str | None = None, replica: str | None = None,
    ) -> None:  # fmt: skip
        await self._conn.execute(
            "UPDATE agents SET last_seen_at = ?, labels = COALESCE(?, labels), "
            "version = COALESCE(?, version), boot_id = COALESCE(?, boot_id), "
            "replica = COALESCE(?, replica) WHERE name = ?",
            (
                to_ms(at),
                None if labels is None else json.dumps(labels, sort_keys=True),
                version,
                boot_id,
                replica,
                name,
            ),
        )

    async def agent_left(self, name: str, replica: str, at: datetime) -> None:
        """The agent's stream on `replica` ended: seen now, and held by no replica unless
        another one took it meanwhile."""
        await self._conn.execute(
            "UPDATE agents SET last_seen_at = ?, "
            "replica = CASE WHEN replica = ? THEN '' ELSE replica END WHERE name = ?",
            [to_ms(at), replica, name],
        )

    async def remove_agent(self, name: str, at: datetime) -> bool:
        cur = await self._conn.execute(
            "UPDATE agents SET removed_at = ?, credential_hash = NULL "
            "WHERE name = ? AND removed_at IS NULL",
            (to_ms(at), name),
        )
        return cur.rowcount == 1

    async def insert_join_token(
        self, token_hash: str, labels: dict[str, str], by: str, at: datetime,
        expires_at: datetime | None, max_uses: int | None, replaces: str | None = None,
    ) -> None:  # fmt: skip
        await self._conn.execute(
            # The same secret issued again (development mode's fixed token) starts afresh.
            "INSERT INTO join_tokens "
            "(hash, labels, created_by, created_at, expires_at, max_uses, replaces) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT (hash) DO UPDATE SET labels = excluded.labels, "
            "created_by = excluded.created_by, created_at = excluded.created_at, "
            "expires_at = excluded.expires_at, max_uses = excluded.max_uses, "
            "replaces = excluded.replaces, uses = 0",
            (token_hash, json.dumps(labels), by, to_ms(at), rec.ms(expires_at), max_uses, replaces),
        )

    async def use_join_token(self, token_hash: str, at: datetime) -> JoinToken | None:
        """Spend one use of a join token (compare-and-set); None if unusable."""
        row = await _one(
            self._conn,
            "UPDATE join_tokens SET uses = uses + 1 WHERE hash = ? AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?) AND (max_uses IS NULL OR uses < max_uses) "
            "RETURNING labels, replaces, max_uses IS NULL AS reusable",
            [token_hash, to_ms(at)],
        )
        if row is None:
            return None
        return JoinToken(dict(json.loads(row["labels"])), row["replaces"], bool(row["reusable"]))

    async def revoke_join_token(self, token_id: str, at: datetime, by: str) -> bool:
        cur = await self._conn.execute(
            "UPDATE join_tokens SET revoked_at = ?, revoked_by = ? "
            "WHERE substr(hash, 1, 16) = ? AND revoked_at IS NULL",
            (to_ms(at), by, token_id),
        )
        return cur.rowcount >= 1

    async def upsert_user(self, name: str, groups: Iterable[str], at: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO users (name, groups, created_at) VALUES (?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET groups = excluded.groups",
            (name, json.dumps(sorted(groups)), to_ms(at)),
        )

    async def get_user_record(self, name: str) -> tuple[frozenset[str], bool, str] | None:
        row = await _one(
            self._conn, "SELECT groups, disabled, managed_by FROM users WHERE name = ?", [name]
        )
        return None if row is None else (frozenset(json.loads(row[0])), bool(row[1]), row[2])

    async def insert_oidc_user(self, name: str, groups: Iterable[str], at: datetime) -> None:
        await self._conn.execute(
            "INSERT INTO users (name, groups, created_at, managed_by) VALUES (?,?,?,'oidc')",
            (name, json.dumps(sorted(groups)), to_ms(at)),
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
        """Register a token hash; False when it was already registered."""
        cur = await self._conn.execute(
            "INSERT INTO tokens (hash, user_name, label, created_at, expires_at, scopes) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT (hash) DO NOTHING",
            (token_hash, user, label, to_ms(at), rec.ms(expires_at), rec.scopes_text(scopes)),
        )
        return cur.rowcount == 1

    async def revoke_token(self, token_id: str, at: datetime) -> bool:
        cur = await self._conn.execute(
            "UPDATE tokens SET revoked_at = ? WHERE substr(hash, 1, 16) = ? AND revoked_at IS NULL",
            (to_ms(at), token_id),
        )
        return cur.rowcount >= 1

    async def set_user_disabled(self, name: str, disabled: bool) -> bool:
        cur = await self._conn.execute(
            "UPDATE users SET disabled = ? WHERE name = ?", (int(disabled), name)
        )
        return cur.rowcount == 1

    async def revoke_certificate(self, serial: str, at: datetime, by: str, reason: str) -> bool:
        """False when the serial was revoked before."""
        cur = await self._conn.execute(
            "INSERT INTO revoked_certificates (serial, revoked_at, revoked_by, reason) "
            "VALUES (?,?,?,?) ON CONFLICT (serial) DO NOTHING",
            (serial, to_ms(at), by, reason),
        )
        return cur.rowcount == 1

    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int:
        row = await _one(
            self._conn, "SELECT COALESCE(MAX(version), 0) + 1 AS version FROM policies"
        )
        version = int(row["version"])
        await self._conn.execute(
            "INSERT INTO policies (version, yaml, sha256, applied_at, applied_by) "
            "VALUES (?,?,?,?,?)",
            (version, text, sha256, to_ms(at), by),
        )
        return version

    async def set_meta(self, key: str, value: str) -> None:
        await self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def audit(self, entry: AuditEntry) -> AuditEvent | None:
        """Append an event to the hash chain. Returns None (and writes nothing) when an event
        with the same id is already stored: agent events are stored exactly once."""
        events = await self.audit_many([entry])
        return events[0] if events else None

    async def _outbox(self, events: Sequence[AuditEvent]) -> None:
        """Notifiable events go to the outbox in the audit event's own transaction."""
        rows = [
            (
                n.id,
                n.kind.value,
                to_ms(n.at),
                n.actor,
                n.subject,
                n.agent,
                n.request_id,
                n.grant_id,
                _details_json(n.details),
            )
            for event in events
            if event.kind in NOTIFIABLE and (n := notice_for(event)) is not None
        ]
        if rows:
            await self._conn.executemany(_OUTBOX_INSERT, rows)

    async def insert_receiver(self, spec: ReceiverSpec) -> bool:
        """False (and nothing written) when a receiver of that name exists. The first receiver
        starts from now: notices written while nobody received them are not sent to it."""
        first = await _one(self._conn, "SELECT NOT EXISTS (SELECT 1 FROM receivers)")
        if first and first[0]:
            await self._conn.execute(
                "INSERT INTO meta (key, value) SELECT ?, CAST(COALESCE(MAX(seq), 0) AS TEXT) "
                "FROM outbox WHERE 1 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (_OUTBOX_CURSOR,),
            )
        cur = await self._conn.execute(
            "INSERT INTO receivers (name, kind, settings, secret, route, created_at, created_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (
                spec.name, spec.kind.value, _details_json(dict(spec.settings)), spec.secret,
                _route_json(spec.route), to_ms(spec.created_at), spec.created_by,
            ),
        )  # fmt: skip
        return cur.rowcount == 1

    async def delete_receiver(self, name: str) -> bool:
        """Removes the receiver; its pending deliveries are given up (attempts stay in the log)."""
        cur = await self._conn.execute("DELETE FROM receivers WHERE name = ?", (name,))
        if cur.rowcount != 1:
            return False
        await self._conn.execute(
            "UPDATE deliveries SET state = 'GAVE_UP', last_error = 'receiver removed' "
            "WHERE receiver = ? AND state = 'PENDING'",
            (name,),
        )
        return True

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
        expected = list(expected)
        states = [s.value for s in expected]
        sets, args = _grant_sets(expected, state, change)
        moved: set[str] = set()
        marks = ",".join("?" * len(states))
        for first in range(0, len(grant_ids), _CHUNK):
            chunk = grant_ids[first : first + _CHUNK]
            rows = await _all(
                self._conn,
                f"UPDATE grants SET {sets} WHERE id IN ({','.join('?' * len(chunk))}) "
                f"AND state IN ({marks}) RETURNING id",
                [*args, *chunk, *states],
            )
            moved.update(row["id"] for row in rows)
        return moved

    async def audit_many(self, entries: Sequence[AuditEntry]) -> list[AuditEvent]:
        """`audit` for many entries, in order, as one batch: the chain is the same as entry by
        entry. Entries whose id is already stored are skipped."""
        if not entries:
            return []
        # Which ids are stored already (agent events sent again), then one executemany: two
        # statements whatever the batch, and the same two on every store.
        stored = await self._stored_audit_ids([entry.id for entry in entries])
        head_seq, head_hash = await self._audit_head()
        events, rows = rec.chain(entries, head_seq, head_hash, stored)
        if not rows:
            return []
        await self._conn.executemany(_AUDIT_INSERT, rows)
        self._head = (events[-1].seq, events[-1].hash)
        self.new_audit.extend(events)
        await self._outbox(events)
        return events

    async def _stored_audit_ids(self, ids: Sequence[str]) -> set[str]:
        stored: set[str] = set()
        for first in range(0, len(ids), _CHUNK):
            chunk = ids[first : first + _CHUNK]
            rows = await _all(
                self._conn,
                f"SELECT id FROM audit WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            stored.update(row["id"] for row in rows)
        return stored

    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, change: GrantChange = NO_CHANGE
    ) -> list[Moved]:
        """Compare-and-set up to `limit` grants past their not_after that may still expire
        (PENDING_DELIVERY, ACTIVE, REVOKING) to `state`, set-based: one UPDATE ... RETURNING per
        state left, no row read into Python before it moves."""
        sets, args = _grant_sets(list(_DUE_GRANT_STATES), state, change)
        moved: list[Moved] = []
        for was in _DUE_GRANT_STATES:
            if len(moved) >= limit:
                break
            # The repeated IN list lets SQLite use the partial index grants_live.
            rows = await _all(
                self._conn,
                f"UPDATE grants SET {sets} WHERE id IN (SELECT id FROM grants "
                f"WHERE state IN ({_DUE_GRANT_IN}) AND state = ? AND not_after <= ? "
                "ORDER BY not_after LIMIT ?) RETURNING id, request_id, agent, subject, action",
                [*args, was.value, to_ms(now), limit - len(moved)],
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
        rows = await _all(
            self._conn,
            "UPDATE requests SET state = ?, decided_at = ?, decided_by = ?, decision_reason = ? "
            "WHERE id IN (SELECT id FROM requests WHERE state = 'PENDING' "
            "AND pending_expires_at <= ? ORDER BY pending_expires_at LIMIT ?) "
            "RETURNING id, agent, subject, action",
            [state.value, to_ms(now), by, reason, to_ms(now), limit],
        )
        pending = RequestState.PENDING.value
        return [Moved(r["id"], "", r["agent"], r["subject"], r["action"], pending) for r in rows]


def _grant_sets(
    expected: Sequence[GrantState], state: GrantState, change: GrantChange
) -> tuple[str, list[Any]]:
    """The SET clause (and its arguments) of a grant compare-and-set; only lifecycle steps are
    allowed (staying in the same state updates columns only)."""
    for current in expected:
        if state is not current and state not in GRANT_TRANSITIONS[current]:
            raise ValueError(f"grant lifecycle has no step {current.value} -> {state.value}")
    sets = ["state = ?"]
    args: list[Any] = [state.value]
    for column, value in rec.grant_change(change):
        sets.append(f"{column} = ?")
        args.append(value)
    return ", ".join(sets), args


# Grant states the expiry sweep moves, in the order it takes them.
_DUE_GRANT_STATES = DUE_GRANT_STATES
_DUE_GRANT_IN = "'PENDING_DELIVERY', 'ACTIVE', 'REVOKING'"  # as in the grants_live index
_AUDIT_INSERT = f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"


# Commits between WAL checkpoints (each commit adds a few pages to the WAL).
CHECKPOINT_EVERY = 200


# Ids per statement in batched updates and lookups (well under SQLite's variable limit).
_CHUNK = 500


class SqliteStore:
    def __init__(self, path: Path, writer: Connection, reader: Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()
        self._commits = 0
        self._checkpointing: asyncio.Task[None] | None = None
        # Told how long each committed write transaction took, from BEGIN to COMMIT, in
        # seconds (the metrics' histogram); must not raise.
        self.observe_transaction: Callable[[float], None] | None = None

    @property
    def commits(self) -> int:
        """Write transactions committed since the store was opened."""
        return self._commits

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate, path)
        writer = await _connect(path)
        reader = await _connect(path)
        return cls(path, writer, reader)

    async def close(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
        await self._reader.close()
        await self._writer.close()
        await asyncio.to_thread(_checkpoint, self.path)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """A write transaction: committed when the block ends, rolled back if it raises.

        Cancel-safe: BEGIN, COMMIT and ROLLBACK run in aiosqlite's thread whatever happens to
        the awaiting task, so they are awaited to their end and the cancellation re-raised
        after. Otherwise a caller cancelled at the wrong moment (a client opening and cancelling
        streams as fast as it can) left a transaction open behind a released lock, and every
        later write failed.

        One writer at a time never meets a serialization failure, so nothing here is retried;
        prefer `write`, which is the same on every store."""
        async with self._lock:
            began = time.monotonic()
            try:
                await _to_the_end(self._writer.execute("BEGIN IMMEDIATE"))
                tx = SqliteTx(self, self._writer)
                yield tx
            except BaseException:
                if self._writer.in_transaction:
                    await _to_the_end(self._writer.execute("ROLLBACK"))
                raise
            try:
                await _to_the_end(self._writer.execute("COMMIT"))
            except asyncio.CancelledError:
                # `_to_the_end` raises this only after the statement succeeded: committed, then
                # cancelled.
                self._commits += 1
                raise
            except BaseException:
                # The commit failed. SQLite rolls back by itself on an I/O error or a full disk
                # (the transaction is then no longer open); otherwise roll back here.
                if self._writer.in_transaction:
                    await _to_the_end(self._writer.execute("ROLLBACK"))
                raise
            self._commits += 1
            if self.observe_transaction is not None:
                self.observe_transaction(time.monotonic() - began)
            if self._commits % CHECKPOINT_EVERY == 0 and (
                self._checkpointing is None or self._checkpointing.done()
            ):
                # Owned by the store and awaited by `close`; it never raises (failures are logged).
                self._checkpointing = asyncio.create_task(asyncio.to_thread(_checkpoint, self.path))

    async def write(self, work: Callable[[SqliteTx], Awaitable[T]]) -> T:
        """Run `work` in one write transaction and commit (see `Store.write`). With one writer
        there is no serialization failure to retry: `work` runs once."""
        async with self.transaction() as tx:
            return await work(tx)

    # Replicas and shared secrets.

    async def replica_seen(
        self, replica: str, address: str, version: str, started_at: datetime, at: datetime
    ) -> None:
        """Record that `replica` runs (at start, and then periodically)."""
        async with self.transaction() as tx:
            await tx._conn.execute(
                "INSERT INTO replicas (id, address, version, started_at, last_seen_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET address = excluded.address, "
                "version = excluded.version, started_at = excluded.started_at, "
                "last_seen_at = excluded.last_seen_at",
                [replica, address, version, to_ms(started_at), to_ms(at)],
            )
            if started_at == at:
                # Started now: no agent stream is held by this replica yet (a crash left some).
                await tx._conn.execute(
                    "UPDATE agents SET replica = '' WHERE replica = ?", [replica]
                )

    async def list_replicas(self) -> list[ReplicaInfo]:
        rows = await _all(
            self._reader,
            "SELECT id, address, version, started_at, last_seen_at FROM replicas ORDER BY id",
        )
        return [rec.replica(r) for r in rows]

    async def get_secret(self, name: str) -> bytes | None:
        row = await _one(self._reader, "SELECT ciphertext FROM secrets WHERE name = ?", [name])
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
        async with self.transaction() as tx:
            cur = await tx._conn.execute(
                "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (?,?,?) "
                f"ON CONFLICT (name) {conflict}",
                [name, ciphertext, to_ms(at)],
            )
        return cur.rowcount == 1

    # Reads: committed data only.

    async def audit_head(self) -> tuple[int, str]:
        return await _audit_head(self._reader)

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        async with self.transaction() as tx:
            await tx._conn.execute(
                "INSERT INTO checkpoints (seq, hash, at, key_id, signature) VALUES (?,?,?,?,?)",
                (checkpoint.seq, checkpoint.hash, to_ms(checkpoint.at), checkpoint.key_id,
                 checkpoint.signature),
            )  # fmt: skip

    async def checkpoints(self) -> list[Checkpoint]:
        rows = await _all(
            self._reader, f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id"
        )
        return [rec.checkpoint(r) for r in rows]

    async def last_checkpoint(self) -> Checkpoint | None:
        row = await _one(
            self._reader, f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id DESC LIMIT 1"
        )
        return None if row is None else rec.checkpoint(row)

    async def get_request(self, request_id: str) -> Request | None:
        return await _get_request(self._reader, request_id)

    async def list_requests(
        self, *, states: Sequence[RequestState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Request], str]:  # fmt: skip
        rows, more = await _newest_first(
            self._reader,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM}",
            "r.",
            [("r.state", [s.value for s in states]), ("r.subject", subject), ("r.agent", agent)],
            page_token,
            limit,
        )
        reviews = await _reviews(self._reader, [r["id"] for r in rows])
        requests = [rec.request(r, reviews.get(r["id"], ())) for r in rows]
        return requests, rec.next_page(requests, more)

    async def get_grant(self, grant_id: str) -> Grant | None:
        return await _get_grant(self._reader, grant_id)

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        """(not_before, not_after, ended_at) of the grants the policy approved by itself for
        `subject` under `rule` after `since` (an automatic grant is made with its request)."""
        return await _recent_auto_grants(self._reader, subject, rule, since)

    async def list_grants(
        self, *, states: Sequence[GrantState], subject: str, agent: str, limit: int,
        page_token: str,
    ) -> tuple[list[Grant], str]:  # fmt: skip
        rows, more = await _newest_first(
            self._reader,
            f"SELECT {_GRANT_COLUMNS} FROM grants",
            "",
            [("state", [s.value for s in states]), ("subject", subject), ("agent", agent)],
            page_token,
            limit,
        )
        grants = [rec.grant(r) for r in rows]
        return grants, rec.next_page(grants, more)

    async def expiring_grants(self, after: datetime, until: datetime, limit: int) -> list[Grant]:
        # The repeated IN list lets SQLite use the partial index grants_live.
        rows = await _all(
            self._reader,
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE state IN ({_DUE_GRANT_IN}) "
            "AND state = 'ACTIVE' AND not_after > ? AND not_after <= ? ORDER BY not_after LIMIT ?",
            [to_ms(after), to_ms(until), limit],
        )
        return [rec.grant(r) for r in rows]

    async def live_grants(self, agent: str) -> list[Grant]:
        return await _live_grants(self._reader, agent)

    async def unremoved_grants(self, agent: str) -> list[Grant]:
        rows = await _all(
            self._reader,
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE agent = ? "
            "AND state IN ('REVOKING', 'REVOKE_FAILED') ORDER BY revoke_seq",
            [agent],
        )
        return [rec.grant(r) for r in rows]

    async def get_agent(self, name: str) -> Agent | None:
        return await _get_agent(self._reader, name)

    async def status_counts(self, now: datetime, ended_since: datetime) -> StatusCounts:
        """Counts for the mesh status and the metrics: live grants by state (the partial index
        grants_live and the agents table keep this cheap), grants ended since `ended_since`,
        pending requests, unacknowledged commands."""
        live = ("PENDING_DELIVERY", "ACTIVE", "REVOKING", "REVOKE_FAILED")
        marks = ", ".join("?" * len(live))
        grants = {
            str(state): int(count)
            for state, count in await _all(
                self._reader,
                f"SELECT state, COUNT(*) FROM grants WHERE state IN ({marks}) GROUP BY state",
                live,
            )
        }
        for state, count in await _all(
            self._reader,
            f"SELECT state, COUNT(*) FROM grants WHERE ended_at >= ? AND state NOT IN ({marks}) "
            "GROUP BY state",
            (rec.ms(ended_since), *live),
        ):
            grants[str(state)] = int(count)
        requests = {
            str(state): int(count)
            for state, count in await _all(
                self._reader,
                "SELECT state, COUNT(*) FROM requests WHERE state IN ('PENDING', 'SCHEDULED') "
                "GROUP BY state",
            )
        }
        agents = await _one(
            self._reader,
            "SELECT COUNT(*), COALESCE(SUM(MAX(last_seq - last_acked_seq, 0)), 0) FROM agents "
            "WHERE removed_at IS NULL",
        )
        locks = await _one(
            self._reader,
            "SELECT COUNT(*) FROM locks WHERE lifted_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (rec.ms(now),),
        )
        policy = await _one(self._reader, "SELECT COALESCE(MAX(version), 0) FROM policies")
        return StatusCounts(
            agents_enrolled=int(agents[0]) if agents else 0,
            requests=requests,
            grants=grants,
            revokes_unacknowledged=grants.get("REVOKING", 0),
            commands_unacknowledged=int(agents[1]) if agents else 0,
            locks_in_force=int(locks[0]) if locks else 0,
            policy_version=int(policy[0]) if policy else 0,
        )

    async def list_agents(self) -> list[Agent]:
        rows = await _all(
            self._reader,
            f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.removed_at IS NULL ORDER BY a.name",
        )
        return [rec.agent(r) for r in rows]

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        return await _agent_for_credential(self._reader, credential_hash)

    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None:
        row = await _one(
            self._reader,
            "SELECT u.name, u.groups, t.scopes FROM tokens t JOIN users u ON u.name = t.user_name "
            "WHERE t.hash = ? AND t.revoked_at IS NULL AND u.disabled = 0 "
            "AND (t.expires_at IS NULL OR t.expires_at > ?)",
            [token_hash, to_ms(now)],
        )
        if row is None:
            return None
        return rec.token_principal(row)

    async def list_tokens(self, user: str) -> list[TokenInfo]:
        rows = await _all(
            self._reader,
            "SELECT hash, user_name, label, created_at, expires_at, revoked_at, scopes FROM tokens "
            "WHERE ? = '' OR user_name = ? ORDER BY created_at, hash",
            [user, user],
        )
        return [rec.token(r) for r in rows]

    async def list_join_tokens(self) -> list[JoinTokenInfo]:
        tokens = await _all(
            self._reader,
            f"SELECT {rec.ENROLLMENT_COLUMNS} FROM join_tokens ORDER BY created_at, hash",
        )
        agents = await _all(
            self._reader,
            "SELECT name, join_token_id FROM agents "
            "WHERE removed_at IS NULL AND join_token_id <> ''",
        )
        used: dict[str, list[str]] = {}
        for a in agents:
            used.setdefault(a["join_token_id"], []).append(a["name"])
        return [rec.join_token_info(t, used.get(t["id"], ())) for t in tokens]

    async def principal_for_user(self, name: str, serial: str) -> Principal | None:
        """The enabled user a client certificate names, unless that certificate was revoked."""
        row = await _one(
            self._reader,
            "SELECT name, groups FROM users WHERE name = ? AND disabled = 0 "
            "AND NOT EXISTS (SELECT 1 FROM revoked_certificates WHERE serial = ?)",
            [name, serial],
        )
        if row is None:
            return None
        return Principal(name=row["name"], groups=frozenset(json.loads(row["groups"])))

    async def get_user(self, name: str) -> UserInfo | None:
        row = await _one(
            self._reader,
            "SELECT name, groups, disabled, created_at, managed_by FROM users WHERE name = ?",
            [name],
        )
        return None if row is None else rec.user(row)

    async def user_groups(self, name: str) -> frozenset[str] | None:
        return await _user_groups(self._reader, name)

    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]:
        rows = await _all(self._reader, _COMMANDS_AFTER, [agent, seq, limit])
        return [rec.command(r, agent) for r in rows]

    async def first_unacked_seq(self, agent: str) -> int | None:
        row = await _one(
            self._reader,
            # A snapshot's own row is never resent (a new Hello gets a new snapshot), so an ack
            # of it lost in a crash must not hold the resume point back for ever.
            "SELECT MIN(seq) AS seq FROM commands WHERE agent = ? AND acked_at IS NULL "
            "AND kind <> 'snapshot'",
            [agent],
        )
        return None if row is None or row["seq"] is None else int(row["seq"])

    async def policy_version(self) -> int:
        """The newest policy version (0: none)."""
        row = await _one(self._reader, "SELECT COALESCE(MAX(version), 0) AS v FROM policies")
        return 0 if row is None else int(row["v"])

    async def current_policy(self) -> PolicyDocument | None:
        row = await _one(
            self._reader,
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
        where.append("seq > ?")
        args.append(after_seq)
        if since is not None:
            where.append("at >= ?")
            args.append(to_ms(since))
        rows = await _all(
            self._reader,
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            [*args, limit],
        )
        return [rec.audit(r) for r in rows]

    async def due_scheduled(self, now: datetime, limit: int) -> list[Request]:
        """SCHEDULED requests whose start has come, earliest first."""
        rows = await _all(
            self._reader,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'SCHEDULED' "
            "AND r.start_at <= ? ORDER BY r.start_at LIMIT ?",
            [to_ms(now), limit],
        )
        reviews = await _reviews(self._reader, [r["id"] for r in rows])
        return [rec.request(r, reviews.get(r["id"], ())) for r in rows]

    async def requests_changed_after(self, after_seq: int, limit: int) -> list[tuple[str, int]]:
        """(request id, its latest audit seq) for requests with audit events after
        `after_seq`, in the order of those latest changes; plus, when `after_seq` is negative,
        nothing but the head: [("", head seq)]."""
        if after_seq < 0:
            row = await _one(self._reader, "SELECT COALESCE(MAX(seq), 0) FROM audit")
            return [("", int(row[0]))]
        rows = await _all(
            self._reader,
            "SELECT request_id, MAX(seq) AS last FROM audit WHERE seq > ? AND request_id <> '' "
            "GROUP BY request_id ORDER BY last LIMIT ?",
            [after_seq, limit],
        )
        return [(r[0], int(r[1])) for r in rows]

    async def audit_chain(self, after_seq: int, limit: int) -> list[AuditEvent]:
        rows = await _all(
            self._reader,
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            [after_seq, limit],
        )
        return [rec.audit(r) for r in rows]

    async def next_deadline(self) -> datetime | None:
        row = await _one(
            self._reader,
            "SELECT MIN(t) AS t FROM ("
            "SELECT MIN(not_after) AS t FROM grants "
            "WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING') "
            "UNION ALL SELECT MIN(pending_expires_at) FROM requests WHERE state = 'PENDING' "
            "UNION ALL SELECT MIN(start_at) FROM requests WHERE state = 'SCHEDULED')",
        )
        return None if row is None or row["t"] is None else from_ms(int(row["t"]))

    async def get_meta(self, key: str) -> str | None:
        return await _get_meta(self._reader, key)

    async def list_locks(self, *, include_ended: bool, now: datetime) -> list[Lock]:
        sql = f"SELECT {_LOCK_COLUMNS} FROM locks"
        args: list[Any] = []
        if not include_ended:
            sql += " WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
            args.append(to_ms(now))
        rows = await _all(self._reader, sql + " ORDER BY created_at DESC, id DESC LIMIT 1000", args)
        return [rec.lock(r) for r in rows]

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        return await _lock_in_force(self._reader, subject, agent, action, now)

    async def list_breakglass_codes(
        self, *, unreviewed: bool, agent: str, subject: str, include_expired: bool, now: datetime
    ) -> list[BreakglassCode]:
        where, args = rec.breakglass_filter(
            unreviewed=unreviewed,
            agent=agent,
            subject=subject,
            include_expired=include_expired,
            now=now,
            mark="?",
        )
        rows = await _all(
            self._reader,
            f"SELECT {_BREAKGLASS_COLUMNS} FROM breakglass_codes WHERE {where} "
            "ORDER BY issued_at DESC, id DESC LIMIT 1000",
            args,
        )
        return [rec.breakglass_code(r) for r in rows]


async def _newest_first(
    conn: Connection,
    select: str,
    alias: str,
    filters: list[tuple[str, Any]],
    page_token: str,
    limit: int,
) -> tuple[list[Any], bool]:
    """One page of rows, newest first, after the page token; and whether more follow."""
    where, args = _filters(filters)
    after = rec.page(page_token)
    if after:
        where.append(f"({alias}created_at, {alias}id) < (?, ?)")
        args.extend(after)
    sql = select + (" WHERE " + " AND ".join(where) if where else "")
    order = f" ORDER BY {alias}created_at DESC, {alias}id DESC LIMIT ?"
    rows = await _all(conn, sql + order, [*args, limit + 1])
    return rows[:limit], len(rows) > limit


def _filters(pairs: list[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in pairs:
        if isinstance(value, list):
            if value:
                where.append(f"{column} IN ({','.join('?' * len(value))})")
                args.extend(value)
        elif value:
            where.append(f"{column} = ?")
            args.append(value)
    return where, args


# Notifications: the outbox, receivers, deliveries and attempts (helpers shared by both stores
# in rows.py).

_OUTBOX_COLUMNS = rec.OUTBOX_COLUMNS
_OUTBOX_INSERT = (
    f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_OUTBOX_CURSOR = rec.OUTBOX_CURSOR
_route_json = rec.route_json
_route = rec.route
_notice = rec.notice
_details_json = rec.details_json


class SqliteOutbox:
    """The sender's side of the outbox. Each method is its own short transaction, so the sender
    never holds the store's writer while it talks to a receiver."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    async def list_receivers(self) -> list[ReceiverSpec]:
        rows = await _all(
            self._store._reader,
            "SELECT name, kind, settings, secret, route, created_at, created_by "
            "FROM receivers ORDER BY name",
        )
        return [
            ReceiverSpec(
                r[0], ReceiverKind(r[1]), json.loads(r[2]), r[3], _route(r[4]), from_ms(r[5]), r[6]
            )
            for r in rows
        ]

    async def unrouted(self, limit: int) -> tuple[int, list[tuple[int, Notice]]]:
        """The routing cursor, and the outbox entries after it (oldest first)."""
        cursor = int(await self._store.get_meta(_OUTBOX_CURSOR) or "0")
        rows = await _all(
            self._store._reader,
            f"SELECT seq, {_OUTBOX_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (cursor, limit),
        )
        return cursor, [(int(r[0]), _notice(r[1:])) for r in rows]

    async def route(
        self, cursor: int, upto: int, deliveries: Sequence[tuple[int, str]], now: datetime
    ) -> bool:
        """Create the deliveries of outbox entries (cursor, upto] and move the cursor, at once;
        False when another sender moved the cursor first (nothing written)."""
        async with self._store.transaction() as tx:
            conn = tx._conn
            current = await _one(conn, "SELECT value FROM meta WHERE key = ?", (_OUTBOX_CURSOR,))
            if int(current[0] if current else "0") != cursor:
                return False
            await conn.executemany(
                "INSERT INTO deliveries (event_seq, receiver, state, next_at) "
                "VALUES (?, ?, 'PENDING', ?) ON CONFLICT DO NOTHING",
                [(seq, name, to_ms(now)) for seq, name in deliveries],
            )
            await tx.set_meta(_OUTBOX_CURSOR, str(upto))
        return True

    async def claim(self, now: datetime, until: datetime, limit: int) -> list[Delivery]:
        """Claim up to `limit` due deliveries until `until` (others leave them alone meanwhile;
        a claim left by a crashed sender lapses then)."""
        async with self._store.transaction() as tx:
            rows = await _all(
                tx._conn,
                "UPDATE deliveries SET claimed_until = ? WHERE rowid IN (SELECT rowid FROM "
                "deliveries WHERE state = 'PENDING' AND next_at <= ? AND claimed_until <= ? "
                "ORDER BY next_at LIMIT ?) RETURNING event_seq, receiver, attempts",
                (to_ms(until), to_ms(now), to_ms(now), limit),
            )
            if not rows:
                return []
            seqs = sorted({int(r[0]) for r in rows})
            notices = {
                int(r[0]): _notice(r[1:])
                for r in await _all(
                    tx._conn,
                    f"SELECT seq, {_OUTBOX_COLUMNS} FROM outbox "
                    f"WHERE seq IN ({','.join('?' * len(seqs))})",
                    seqs,
                )
            }
        return sorted(
            (Delivery(int(r[0]), r[1], int(r[2]), notices[int(r[0])]) for r in rows),
            key=lambda d: (d.event_seq, d.receiver),
        )

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
            await tx._conn.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, claimed_until = 0, "
                "last_error = ?, delivered_at = ? WHERE event_seq = ? AND receiver = ? "
                "AND state = 'PENDING'",
                (
                    state.value, attempt, due, "" if ok else detail, to_ms(at) if ok else None,
                    delivery.event_seq, delivery.receiver,
                ),
            )  # fmt: skip
            await tx._conn.execute(
                "INSERT INTO delivery_attempts (event_seq, receiver, attempt, at, ok, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (delivery.event_seq, delivery.receiver, attempt, to_ms(at), int(ok), detail),
            )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give claims back (a sender stopping before it tried them)."""
        if not deliveries:
            return
        async with self._store.transaction() as tx:
            await tx._conn.executemany(
                "UPDATE deliveries SET claimed_until = 0 WHERE event_seq = ? AND receiver = ? "
                "AND state = 'PENDING'",
                [(d.event_seq, d.receiver) for d in deliveries],
            )

    async def prune(self, before: datetime) -> int:
        """Delete notices written before `before` that are routed and have no PENDING delivery
        (with their deliveries and attempts); how many."""
        async with self._store.transaction() as tx:
            cursor = await _one(tx._conn, "SELECT value FROM meta WHERE key = ?", (_OUTBOX_CURSOR,))
            upto = int(cursor[0]) if cursor else 0
            rows = await _all(
                tx._conn,
                "SELECT seq FROM outbox o WHERE o.at < ? AND o.seq <= ? AND NOT EXISTS "
                "(SELECT 1 FROM deliveries d WHERE d.event_seq = o.seq AND d.state = 'PENDING') "
                "ORDER BY seq LIMIT 5000",
                (to_ms(before), upto),
            )
            seqs = [(int(r[0]),) for r in rows]
            await tx._conn.executemany("DELETE FROM delivery_attempts WHERE event_seq = ?", seqs)
            await tx._conn.executemany("DELETE FROM deliveries WHERE event_seq = ?", seqs)
            await tx._conn.executemany("DELETE FROM outbox WHERE seq = ?", seqs)
        return len(seqs)

    async def next_due(self) -> datetime | None:
        row = await _one(
            self._store._reader,
            "SELECT MIN(MAX(next_at, claimed_until)) FROM deliveries WHERE state = 'PENDING'",
        )
        return from_ms(row[0]) if row and row[0] is not None else None

    async def deliveries(
        self, *, receiver: str, states: Sequence[DeliveryState], limit: int, before: int
    ) -> list[DeliveryRecord]:
        """Deliveries, newest notice first; `before`: only notices older than this outbox seq
        (the page cursor)."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if receiver:
            where.append("d.receiver = ?")
            args.append(receiver)
        if states:
            where.append(f"d.state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if before:
            where.append("d.event_seq < ?")
            args.append(before)
        rows = await _all(
            self._store._reader,
            "SELECT d.event_seq, o.event_id, o.kind, d.receiver, d.state, d.attempts, "
            "(SELECT MAX(a.at) FROM delivery_attempts a WHERE a.event_seq = d.event_seq "
            "AND a.receiver = d.receiver), d.next_at, d.last_error, o.request_id, o.grant_id "
            "FROM deliveries d JOIN outbox o ON o.seq = d.event_seq "
            f"WHERE {' AND '.join(where)} ORDER BY d.event_seq DESC, d.receiver LIMIT ?",
            [*args, limit],
        )
        return [
            DeliveryRecord(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                DeliveryState(r[4]),
                int(r[5]),
                rec.at(r[6]),
                rec.at(r[7]) if r[4] == "PENDING" else None,
                r[8],
                r[9],
                r[10],
            )
            for r in rows
        ]

    async def log(self, *, request_id: str, receiver: str, limit: int) -> list[AttemptRecord]:
        """Attempts, newest first, optionally for one request or one receiver."""
        where, args = ["1 = 1"], []
        if request_id:
            where.append("o.request_id = ?")
            args.append(request_id)
        if receiver:
            where.append("a.receiver = ?")
            args.append(receiver)
        rows = await _all(
            self._store._reader,
            "SELECT a.event_seq, o.event_id, o.kind, a.receiver, a.attempt, a.at, a.ok, a.detail, "
            "COALESCE(d.state, 'GAVE_UP') FROM delivery_attempts a "
            "JOIN outbox o ON o.seq = a.event_seq "
            "LEFT JOIN deliveries d ON d.event_seq = a.event_seq AND d.receiver = a.receiver "
            f"WHERE {' AND '.join(where)} ORDER BY a.id DESC LIMIT ?",
            [*args, limit],
        )
        return [
            AttemptRecord(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                int(r[4]),
                from_ms(r[5]),
                bool(r[6]),
                r[7],
                DeliveryState(r[8]),
            )
            for r in rows
        ]
