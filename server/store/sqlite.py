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
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from yoyo import get_backend, read_migrations

from jitmesh.clock import from_ms, to_ms
from jitmesh.types import (
    Agent,
    AuditEvent,
    Grant,
    GrantState,
    JoinTokenInfo,
    Lock,
    LockTarget,
    OfflineMode,
    OfflinePolicy,
    PolicyDocument,
    Request,
    RequestState,
    Review,
    ReviewDecision,
    TokenInfo,
    UserInfo,
)
from server.domain.approval import plan_from_json, plan_json
from server.domain.audit import GENESIS, canonical_details, chain_hash, event_hash
from server.domain.errors import Conflict, InvalidArgument
from server.domain.lifecycle import DUE_GRANT_STATES, GRANT_TRANSITIONS, REQUEST_TRANSITIONS
from server.domain.models import (
    AuditEntry,
    Command,
    CommandKind,
    JoinToken,
    Moved,
    Principal,
    StatusCounts,
)
from server.domain.notices import NOTIFIABLE, Notice, NoticeKind, notice_for
from server.domain.reads import page_token_after
from server.domain.receivers import (
    AttemptRecord,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    ReceiverKind,
    ReceiverSpec,
    Route,
)

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"

_REQUEST_COLUMNS = (
    "r.id, r.subject, r.agent, r.action, r.duration_ms, r.reason, r.state, r.rule, "
    "r.approvals_required, r.approver_groups, r.created_at, r.pending_expires_at, r.decided_at, "
    "r.decided_by, r.decision_reason, r.grant_id, g.state, r.plan, r.ticket, r.start_at, "
    "r.selector, r.grant_ids, r.reused, r.extends_grant_id"
)
_REQUEST_FROM = "requests r LEFT JOIN grants g ON g.id = r.grant_id"
_GRANT_COLUMNS = (
    "id, request_id, agent, subject, action, not_before, not_after, state, offline_mode, "
    "offline_grace_ms, created_at, ended_at, ended_by, end_reason, grant_seq, revoke_seq, "
    "applied_at, failure, epoch, extensions, original_not_after"
)
_GRANT_COLUMNS_G = ", ".join("g." + c for c in _GRANT_COLUMNS.split(", "))
_AUDIT_COLUMNS = (
    "seq, id, at, actor, kind, subject, agent, request_id, grant_id, details, prev_hash, hash"
)
_AGENT_COLUMNS = (
    "a.name, a.labels, a.enrolled_at, a.last_seen_at, a.version, a.last_acked_seq, a.last_seq, "
    "(SELECT COUNT(*) FROM grants g WHERE g.agent = a.name "
    "AND g.state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING', 'REVOKE_FAILED'))"
)
LIVE_STATES = ("PENDING_DELIVERY", "ACTIVE", "REVOKING", "REVOKE_FAILED")


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


def _ms(at: datetime | None) -> int | None:
    return None if at is None else to_ms(at)


def _at(ms: int | None) -> datetime | None:
    return None if ms is None else from_ms(ms)


def _request(row: Sequence[Any], reviews: tuple[Review, ...]) -> Request:
    return Request(
        id=row[0],
        subject=row[1],
        agent=row[2],
        action=row[3],
        duration=timedelta(milliseconds=row[4]),
        reason=row[5],
        state=RequestState(row[6]),
        rule=row[7],
        approvals_required=row[8],
        approver_groups=tuple(json.loads(row[9])),
        reviews=reviews,
        created_at=from_ms(row[10]),
        pending_expires_at=_at(row[11]),
        decided_at=_at(row[12]),
        decided_by=row[13],
        decision_reason=row[14],
        grant_id=row[15],
        grant_state=GrantState(row[16]) if row[16] else None,
        plan=plan_from_json(row[17]),
        ticket=row[18],
        start_at=_at(row[19]),
        selector=json.loads(row[20]) if row[20] else {},
        grant_ids=tuple(json.loads(row[21])) if row[21] else (),
        reused=bool(row[22]),
        extends_grant_id=row[23],
    )


def _grant(row: Sequence[Any]) -> Grant:
    return Grant(
        id=row[0],
        request_id=row[1],
        agent=row[2],
        subject=row[3],
        action=row[4],
        not_before=from_ms(row[5]),
        not_after=from_ms(row[6]),
        state=GrantState(row[7]),
        offline=OfflinePolicy(OfflineMode(row[8]), timedelta(milliseconds=row[9])),
        created_at=from_ms(row[10]),
        ended_at=_at(row[11]),
        ended_by=row[12],
        end_reason=row[13],
        grant_seq=row[14],
        revoke_seq=row[15],
        applied_at=_at(row[16]),
        failure=row[17],
        epoch=row[18],
        extensions=row[19],
        original_not_after=_at(row[20]),
    )


def _audit(row: Sequence[Any]) -> AuditEvent:
    return AuditEvent(
        seq=row[0],
        id=row[1],
        at=from_ms(row[2]),
        actor=row[3],
        kind=row[4],
        subject=row[5],
        agent=row[6],
        request_id=row[7],
        grant_id=row[8],
        details=json.loads(row[9]),
        prev_hash=row[10],
        hash=row[11],
    )


def _agent(row: Sequence[Any]) -> Agent:
    return Agent(
        name=row[0],
        labels=json.loads(row[1]),
        connected=False,
        last_seen_at=_at(row[3]),
        enrolled_at=from_ms(row[2]),
        version=row[4],
        last_acked_seq=row[5],
        last_seq=row[6],
        active_grants=row[7],
    )


# Each read is one call on the connection's thread (execute and fetch all rows together), never
# a cursor held open across awaits: an open statement holds the connection's read snapshot, and
# another coroutine's read on the same connection in between would see that older snapshot
# (a request committed a moment ago reads back as missing). One thread hop instead of three, too.
async def _one(conn: Connection, sql: str, args: Iterable[Any] = ()) -> Any:
    rows = await conn.execute_fetchall(sql, tuple(args))
    return next(iter(rows), None)


async def _all(conn: Connection, sql: str, args: Iterable[Any] = ()) -> list[Any]:
    return list(await conn.execute_fetchall(sql, tuple(args)))


async def _get_request(conn: Connection, request_id: str) -> Request | None:
    row = await _one(
        conn, f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.id = ?", [request_id]
    )
    if row is None:
        return None
    reviews = await _reviews(conn, [request_id])
    return _request(row, reviews.get(request_id, ()))


async def _reviews(conn: Connection, ids: list[str]) -> dict[str, tuple[Review, ...]]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = await _all(
        conn,
        "SELECT request_id, reviewer, decision, reason, reviewed_at, groups FROM reviews "
        f"WHERE request_id IN ({marks}) ORDER BY reviewed_at, reviewer",
        ids,
    )
    out: dict[str, list[Review]] = {}
    for rid, reviewer, decision, reason, at, groups in rows:
        out.setdefault(rid, []).append(
            Review(
                reviewer, ReviewDecision(decision), reason, from_ms(at), tuple(json.loads(groups))
            )
        )
    return {k: tuple(v) for k, v in out.items()}


async def _get_grant(conn: Connection, grant_id: str) -> Grant | None:
    row = await _one(conn, f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = ?", [grant_id])
    return None if row is None else _grant(row)


async def _get_agent(conn: Connection, name: str) -> Agent | None:
    row = await _one(
        conn,
        f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.name = ? AND a.removed_at IS NULL",
        [name],
    )
    return None if row is None else _agent(row)


_LOCK_COLUMNS = (
    "id, subject, agent, action, reason, created_by, created_at, expires_at, lifted_at, "
    "lifted_by, lift_reason"
)


def _lock(row: Sequence[Any]) -> Lock:
    return Lock(
        id=row[0],
        target=LockTarget(subject=row[1], agent=row[2], action=row[3]),
        reason=row[4],
        created_by=row[5],
        created_at=from_ms(row[6]),
        expires_at=_at(row[7]),
        lifted_at=_at(row[8]),
        lifted_by=row[9],
        lift_reason=row[10],
    )


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
    return None if row is None else _lock(row)


def _page(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    at, _, key = token.partition(":")
    try:
        value = int(at)
    except ValueError:
        raise InvalidArgument("page token is not valid") from None
    if not 0 <= value < 2**63:
        raise InvalidArgument("page token is not valid")
    return value, key


_REQUEST_INSERT = (
    "INSERT INTO requests (id, subject, agent, action, duration_ms, reason, state, rule, "
    "approvals_required, approver_groups, created_at, pending_expires_at, decided_at, "
    "decided_by, decision_reason, grant_id, plan, ticket, start_at, selector, grant_ids, "
    "reused, extends_grant_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_GRANT_INSERT = (
    f"INSERT INTO grants ({_GRANT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_COMMAND_INSERT = (
    "INSERT INTO commands (agent, seq, kind, grant_id, revoke_reason, created_at) "
    "VALUES (?,?,?,?,?,?)"
)


def _request_row(r: Request) -> tuple[Any, ...]:
    return (
        r.id, r.subject, r.agent, r.action, r.duration // timedelta(milliseconds=1),
        r.reason, r.state.value, r.rule, r.approvals_required,
        json.dumps(list(r.approver_groups)), to_ms(r.created_at),
        _ms(r.pending_expires_at), _ms(r.decided_at), r.decided_by, r.decision_reason,
        r.grant_id, plan_json(r.plan), r.ticket, _ms(r.start_at),
        json.dumps(r.selector) if r.selector else "",
        json.dumps(list(r.grant_ids)) if r.grant_ids else "", int(r.reused), r.extends_grant_id,
    )  # fmt: skip


def _grant_row(g: Grant) -> tuple[Any, ...]:
    return (
        g.id, g.request_id, g.agent, g.subject, g.action, to_ms(g.not_before),
        to_ms(g.not_after), g.state.value, g.offline.mode.value,
        g.offline.grace // timedelta(milliseconds=1), to_ms(g.created_at),
        _ms(g.ended_at), g.ended_by, g.end_reason, g.grant_seq, g.revoke_seq,
        _ms(g.applied_at), g.failure, g.epoch, g.extensions, _ms(g.original_not_after),
    )  # fmt: skip


class SqliteTx:
    """One write transaction. Methods that change state by compare-and-set return False when the
    row was not in the expected state, so the caller decides what that means."""

    def __init__(self, store: SqliteStore, conn: Connection) -> None:
        self._store = store
        self._conn = conn
        self.head_seq, self.head_hash = store.head
        self.new_audit: list[AuditEvent] = []

    async def get_request(self, request_id: str) -> Request | None:
        return await _get_request(self._conn, request_id)

    async def get_grant(self, grant_id: str) -> Grant | None:
        return await _get_grant(self._conn, grant_id)

    async def get_agent(self, name: str) -> Agent | None:
        return await _get_agent(self._conn, name)

    async def insert_request(self, r: Request) -> None:
        await self._conn.execute(_REQUEST_INSERT, _request_row(r))

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
        return [_agent(r) for r in rows]

    async def insert_review(self, request_id: str, review: Review) -> bool:
        try:
            await self._conn.execute(
                "INSERT INTO reviews (request_id, reviewer, decision, reason, reviewed_at, "
                "groups) VALUES (?,?,?,?,?,?)",
                (request_id, review.reviewer, review.decision.value, review.reason,
                 to_ms(review.reviewed_at), json.dumps(list(review.groups))),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            return False
        return True

    async def insert_grant(self, g: Grant) -> None:
        await self._conn.execute(_GRANT_INSERT, _grant_row(g))

    async def move_grant(
        self,
        grant_id: str,
        *,
        expected: Iterable[GrantState],
        state: GrantState,
        **fields: Any,
    ) -> bool:
        """Compare-and-set the grant's state, with extra column updates (instants as datetimes).
        Only steps of the grant lifecycle (`GRANT_TRANSITIONS`) may be asked for."""
        expected = list(expected)
        states = [s.value for s in expected]
        sets, args = _grant_sets(expected, state, fields)
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
        seq = int(row[0])
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
        await self._conn.executemany(_REQUEST_INSERT, [_request_row(r) for r in requests])

    async def insert_grants(self, grants: Sequence[Grant]) -> None:
        """`insert_grant` for many grants, one statement for all (group commit)."""
        await self._conn.executemany(_GRANT_INSERT, [_grant_row(g) for g in grants])

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
            found.update((r[0], _grant(r)) for r in rows)
        return found

    # Locks.

    async def insert_lock(self, lock: Lock) -> None:
        t = lock.target
        await self._conn.execute(
            f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                lock.id, t.subject, t.agent, t.action, lock.reason, lock.created_by,
                to_ms(lock.created_at), _ms(lock.expires_at), None, "", "",
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
        return None if row is None else _lock(row)

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
        return [_lock(r) for r in rows]

    async def locked_grants(self, target: LockTarget, states: Iterable[GrantState]) -> list[Grant]:
        """Grants in `states` that the target matches, on agents still enrolled, per agent in
        the order they were granted."""
        where, args = _lock_match(target, "g.")
        wanted = [s.value for s in states]
        rows = await _all(
            self._conn,
            f"SELECT {_GRANT_COLUMNS_G} FROM grants g JOIN agents a ON a.name = g.agent "
            f"WHERE a.removed_at IS NULL AND g.state IN ({','.join('?' * len(wanted))}) {where} "
            "ORDER BY g.agent, g.grant_seq",
            [*wanted, *args],
        )
        return [_grant(r) for r in rows]

    async def user_groups(self, name: str) -> frozenset[str] | None:
        row = await _one(self._conn, "SELECT groups FROM users WHERE name = ?", [name])
        return None if row is None else frozenset(json.loads(row[0]))

    async def pending_requests(self) -> list[Request]:
        """Every PENDING request, oldest first (a new policy judges them all)."""
        rows = await _all(
            self._conn,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'PENDING' "
            "ORDER BY r.created_at, r.id",
        )
        reviews = await _reviews(self._conn, [r[0] for r in rows])
        return [_request(r, reviews.get(r[0], ())) for r in rows]

    async def locked_requests(self, target: LockTarget) -> list[Request]:
        """Pending requests the target matches."""
        where, args = _lock_match(target, "r.")
        rows = await _all(
            self._conn,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'PENDING' {where} "
            "ORDER BY r.created_at, r.id",
            args,
        )
        reviews = await _reviews(self._conn, [r[0] for r in rows])
        return [_request(r, reviews.get(r[0], ())) for r in rows]

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
        version: str | None = None, boot_id: str | None = None,
    ) -> None:  # fmt: skip
        await self._conn.execute(
            "UPDATE agents SET last_seen_at = ?, labels = COALESCE(?, labels), "
            "version = COALESCE(?, version), boot_id = COALESCE(?, boot_id) WHERE name = ?",
            (
                to_ms(at),
                None if labels is None else json.dumps(labels, sort_keys=True),
                version,
                boot_id,
                name,
            ),
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
            "INSERT OR REPLACE INTO join_tokens "
            "(hash, labels, created_by, created_at, expires_at, max_uses, replaces) "
            "VALUES (?,?,?,?,?,?,?)",
            (token_hash, json.dumps(labels), by, to_ms(at), _ms(expires_at), max_uses, replaces),
        )

    async def use_join_token(self, token_hash: str, at: datetime) -> JoinToken | None:
        """Spend one use of a join token (compare-and-set); None if unusable."""
        row = await _one(
            self._conn,
            "UPDATE join_tokens SET uses = uses + 1 WHERE hash = ? AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?) AND (max_uses IS NULL OR uses < max_uses) "
            "RETURNING labels, replaces, max_uses IS NULL",
            [token_hash, to_ms(at)],
        )
        if row is None:
            return None
        return JoinToken(dict(json.loads(row[0])), row[1], bool(row[2]))

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
        self, token_hash: str, user: str, at: datetime, expires_at: datetime | None, label: str
    ) -> bool:
        """Register a token hash; False when it was already registered."""
        cur = await self._conn.execute(
            "INSERT OR IGNORE INTO tokens (hash, user_name, label, created_at, expires_at) "
            "VALUES (?,?,?,?,?)",
            (token_hash, user, label, to_ms(at), _ms(expires_at)),
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
            "INSERT OR IGNORE INTO revoked_certificates (serial, revoked_at, revoked_by, reason) "
            "VALUES (?,?,?,?)",
            (serial, to_ms(at), by, reason),
        )
        return cur.rowcount == 1

    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int:
        row = await _one(self._conn, "SELECT COALESCE(MAX(version), 0) + 1 FROM policies")
        version = int(row[0])
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
        event = AuditEvent(
            seq=self.head_seq + 1,
            id=entry.id,
            at=from_ms(to_ms(entry.at)),
            actor=entry.actor,
            kind=entry.kind,
            subject=entry.subject,
            agent=entry.agent,
            request_id=entry.request_id,
            grant_id=entry.grant_id,
            details=dict(entry.details),
            prev_hash=self.head_hash,
            hash="",
        )
        event = replace(event, hash=event_hash(event))
        # One statement: a stored id makes it insert nothing (and the head stays where it is).
        cur = await self._conn.execute(
            f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (id) DO NOTHING",
            (
                event.seq, event.id, to_ms(event.at), event.actor, event.kind, event.subject,
                event.agent, event.request_id, event.grant_id, _details_json(event.details),
                event.prev_hash, event.hash,
            ),
        )  # fmt: skip
        if cur.rowcount != 1:
            return None
        self.head_seq, self.head_hash = event.seq, event.hash
        self.new_audit.append(event)
        await self._outbox([event])
        return event

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
        **fields: Any,
    ) -> set[str]:
        """`move_grant` for many grants at once (one statement per chunk, not one per grant).
        Returns the ids that were in an expected state and moved."""
        expected = list(expected)
        states = [s.value for s in expected]
        sets, args = _grant_sets(expected, state, fields)
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
            moved.update(row[0] for row in rows)
        return moved

    async def audit_many(self, entries: Sequence[AuditEntry]) -> list[AuditEvent]:
        """`audit` for many entries, in order, as one batch: the chain is the same as entry by
        entry. Entries whose id is already stored are skipped."""
        events, rows = _chain(entries, self.head_seq, self.head_hash, set())
        if not rows:
            return []
        # One executemany for the batch. Ids are almost always fresh (the coordinator's own are
        # random), so the batch is tried as it is, inside a savepoint; only when an id turns out
        # to be stored already is it rolled back and chained again without the stored ones.
        await self._conn.execute("SAVEPOINT audit_many")
        try:
            await self._conn.executemany(_AUDIT_INSERT, rows)
        except sqlite3.IntegrityError:
            await self._conn.execute("ROLLBACK TO audit_many")
            await self._conn.execute("RELEASE audit_many")
            stored = await self._stored_audit_ids([entry.id for entry in entries])
            events, rows = _chain(entries, self.head_seq, self.head_hash, stored)
            if not rows:
                return []
            await self._conn.executemany(_AUDIT_INSERT, rows)
        else:
            await self._conn.execute("RELEASE audit_many")
        self.head_seq, self.head_hash = events[-1].seq, events[-1].hash
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
            stored.update(row[0] for row in rows)
        return stored

    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, **fields: Any
    ) -> list[Moved]:
        """Compare-and-set up to `limit` grants past their not_after that may still expire
        (PENDING_DELIVERY, ACTIVE, REVOKING) to `state`, set-based: one UPDATE ... RETURNING per
        state left, no row read into Python before it moves."""
        sets, args = _grant_sets(list(_DUE_GRANT_STATES), state, fields)
        moved: list[Moved] = []
        for was in _DUE_GRANT_STATES:
            if len(moved) >= limit:
                break
            # The repeated IN list lets SQLite use the partial index grants_live.
            rows = await _all(
                self._conn,
                f"UPDATE grants SET {sets} WHERE rowid IN (SELECT rowid FROM grants "
                f"WHERE state IN ({_DUE_GRANT_IN}) AND state = ? AND not_after <= ? "
                "ORDER BY not_after LIMIT ?) RETURNING id, request_id, agent, subject, action",
                [*args, was.value, to_ms(now), limit - len(moved)],
            )
            w = was.value
            moved.extend(Moved(r[0], r[1], r[2], r[3], r[4], w) for r in rows)
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
            "WHERE rowid IN (SELECT rowid FROM requests WHERE state = 'PENDING' "
            "AND pending_expires_at <= ? ORDER BY pending_expires_at LIMIT ?) "
            "RETURNING id, agent, subject, action",
            [state.value, to_ms(now), by, reason, to_ms(now), limit],
        )
        return [Moved(r[0], "", r[1], r[2], r[3], RequestState.PENDING.value) for r in rows]


def _grant_sets(
    expected: Sequence[GrantState], state: GrantState, fields: dict[str, Any]
) -> tuple[str, list[Any]]:
    """The SET clause (and its arguments) of a grant compare-and-set; only lifecycle steps and
    updatable columns are allowed (staying in the same state updates columns only)."""
    for current in expected:
        if state is not current and state not in GRANT_TRANSITIONS[current]:
            raise ValueError(f"grant lifecycle has no step {current.value} -> {state.value}")
    sets = ["state = ?"]
    args: list[Any] = [state.value]
    for column, value in fields.items():
        if column not in _GRANT_UPDATABLE:
            raise ValueError(f"column {column} cannot be updated")
        sets.append(f"{column} = ?")
        args.append(to_ms(value) if isinstance(value, datetime) else value)
    return ", ".join(sets), args


def _chain(
    entries: Sequence[AuditEntry], seq: int, prev: str, skip: set[str]
) -> tuple[list[AuditEvent], list[tuple[Any, ...]]]:
    """The audit events (and their rows) that extend the chain at (seq, prev) with `entries`,
    leaving out ids in `skip` and repeated ids. Pure Python, per entry only what differs: the
    instant's and the details' encodings are reused across entries that share them (a sweep's
    entries share the instant and a few details shapes)."""
    events: list[AuditEvent] = []
    rows: list[tuple[Any, ...]] = []
    seen = set(skip)
    instants: dict[datetime, tuple[int, datetime]] = {}
    shapes: dict[tuple[tuple[str, str], ...], tuple[str, str]] = {}
    for entry in entries:
        if entry.id in seen:
            continue
        seen.add(entry.id)
        instant = instants.get(entry.at)
        if instant is None:
            at_ms = to_ms(entry.at)
            instant = instants[entry.at] = (at_ms, from_ms(at_ms))
        key = tuple(entry.details.items())
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = (canonical_details(entry.details), _details_json(entry.details))
        seq += 1
        digest = chain_hash(
            seq, entry.id, instant[0], entry.actor, entry.kind, entry.subject, entry.agent,
            entry.request_id, entry.grant_id, shape[0], prev,
        )  # fmt: skip
        events.append(
            AuditEvent(
                seq, entry.id, instant[1], entry.actor, entry.kind, entry.subject, entry.agent,
                entry.request_id, entry.grant_id, dict(entry.details), prev, digest,
            )
        )  # fmt: skip
        rows.append(
            (
                seq, entry.id, instant[0], entry.actor, entry.kind, entry.subject, entry.agent,
                entry.request_id, entry.grant_id, shape[1], prev, digest,
            )
        )  # fmt: skip
        prev = digest
    return events, rows


# Grant states the expiry sweep moves, in the order it takes them.
_DUE_GRANT_STATES = DUE_GRANT_STATES
_DUE_GRANT_IN = "'PENDING_DELIVERY', 'ACTIVE', 'REVOKING'"  # as in the grants_live index
_AUDIT_INSERT = f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"


# Commits between WAL checkpoints (each commit adds a few pages to the WAL).
CHECKPOINT_EVERY = 200

# The same text as json.dumps(..., sort_keys=True), without building an encoder per call.
_details_json = json.JSONEncoder(sort_keys=True).encode

# Ids per statement in batched updates and lookups (well under SQLite's variable limit).
_CHUNK = 500

_GRANT_UPDATABLE = frozenset(
    {"ended_at", "ended_by", "end_reason", "applied_at", "failure", "epoch"}
)


class SqliteStore:
    def __init__(self, path: Path, writer: Connection, reader: Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()
        self.head: tuple[int, str] = (0, GENESIS)
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
        store = cls(path, writer, reader)
        row = await _one(writer, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        if row is not None:
            store.head = (int(row[0]), str(row[1]))
        return store

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
        streams as fast as it can) left a transaction open behind a released lock, or a commit
        without the head moving, and every later write failed."""
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
                # cancelled. The head moves with what was stored.
                self.head = (tx.head_seq, tx.head_hash)
                self._commits += 1
                raise
            except BaseException:
                # The commit failed. SQLite rolls back by itself on an I/O error or a full disk
                # (the transaction is then no longer open); otherwise roll back here. Either
                # way nothing was stored, so the head stays where it was.
                if self._writer.in_transaction:
                    await _to_the_end(self._writer.execute("ROLLBACK"))
                raise
            self.head = (tx.head_seq, tx.head_hash)
            self._commits += 1
            if self.observe_transaction is not None:
                self.observe_transaction(time.monotonic() - began)
            if self._commits % CHECKPOINT_EVERY == 0 and (
                self._checkpointing is None or self._checkpointing.done()
            ):
                # Owned by the store and awaited by `close`; it never raises (failures are logged).
                self._checkpointing = asyncio.create_task(asyncio.to_thread(_checkpoint, self.path))

    # Reads: committed data only.

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
        reviews = await _reviews(self._reader, [r[0] for r in rows])
        requests = [_request(r, reviews.get(r[0], ())) for r in rows]
        return requests, _next_token(requests, more)

    async def get_grant(self, grant_id: str) -> Grant | None:
        return await _get_grant(self._reader, grant_id)

    async def recent_auto_grants(
        self, subject: str, rule: str, since: datetime
    ) -> list[tuple[datetime, datetime, datetime | None]]:
        """(not_before, not_after, ended_at) of the grants the policy approved by itself for
        `subject` under `rule` after `since` (an automatic grant is made with its request)."""
        rows = await _all(
            self._reader,
            "SELECT g.not_before, g.not_after, g.ended_at FROM requests r "
            "JOIN grants g ON g.id = r.grant_id WHERE r.created_at > ? AND r.subject = ? "
            "AND r.rule = ? AND r.decided_by LIKE 'policy:%'",
            [to_ms(since), subject, rule],
        )
        return [(from_ms(a), from_ms(b), _at(c)) for a, b, c in rows]

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
        grants = [_grant(r) for r in rows]
        return grants, _next_token(grants, more)

    async def expiring_grants(self, after: datetime, until: datetime, limit: int) -> list[Grant]:
        # The repeated IN list lets SQLite use the partial index grants_live.
        rows = await _all(
            self._reader,
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE state IN ({_DUE_GRANT_IN}) "
            "AND state = 'ACTIVE' AND not_after > ? AND not_after <= ? ORDER BY not_after LIMIT ?",
            [to_ms(after), to_ms(until), limit],
        )
        return [_grant(r) for r in rows]

    async def live_grants(self, agent: str) -> list[Grant]:
        rows = await _all(
            self._reader,
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE agent = ? "
            "AND state IN ('PENDING_DELIVERY', 'ACTIVE') ORDER BY grant_seq",
            [agent],
        )
        return [_grant(r) for r in rows]

    async def unremoved_grants(self, agent: str) -> list[Grant]:
        rows = await _all(
            self._reader,
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE agent = ? "
            "AND state IN ('REVOKING', 'REVOKE_FAILED') ORDER BY revoke_seq",
            [agent],
        )
        return [_grant(r) for r in rows]

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
            (_ms(ended_since), *live),
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
            (_ms(now),),
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
        return [_agent(r) for r in rows]

    async def agent_for_credential(self, credential_hash: str) -> str | None:
        row = await _one(
            self._reader,
            "SELECT name FROM agents WHERE credential_hash = ? AND removed_at IS NULL",
            [credential_hash],
        )
        return None if row is None else str(row[0])

    async def principal_for_token(self, token_hash: str, now: datetime) -> Principal | None:
        row = await _one(
            self._reader,
            "SELECT u.name, u.groups FROM tokens t JOIN users u ON u.name = t.user_name "
            "WHERE t.hash = ? AND t.revoked_at IS NULL AND u.disabled = 0 "
            "AND (t.expires_at IS NULL OR t.expires_at > ?)",
            [token_hash, to_ms(now)],
        )
        if row is None:
            return None
        return Principal(name=row[0], groups=frozenset(json.loads(row[1])))

    async def list_tokens(self, user: str) -> list[TokenInfo]:
        rows = await _all(
            self._reader,
            "SELECT hash, user_name, label, created_at, expires_at, revoked_at FROM tokens "
            "WHERE ? = '' OR user_name = ? ORDER BY created_at, hash",
            [user, user],
        )
        return [
            TokenInfo(str(r[0])[:16], r[1], r[2], from_ms(r[3]), _at(r[4]), _at(r[5])) for r in rows
        ]

    async def list_join_tokens(self) -> list[JoinTokenInfo]:
        rows = await _all(
            self._reader,
            "SELECT substr(j.hash, 1, 16), j.labels, COALESCE(j.replaces, ''), j.created_by, "
            "j.created_at, j.expires_at, j.max_uses - j.uses, j.revoked_at, j.revoked_by, "
            "(SELECT json_group_array(a.name) FROM agents a "
            " WHERE a.join_token_id = substr(j.hash, 1, 16) AND a.removed_at IS NULL) "
            "FROM join_tokens j ORDER BY j.created_at, j.hash",
            [],
        )
        return [
            JoinTokenInfo(
                r[0], dict(json.loads(r[1])), r[2], r[3], from_ms(r[4]), _at(r[5]),
                None if r[6] is None else max(int(r[6]), 0), _at(r[7]), r[8],
                tuple(sorted(json.loads(r[9]))),
            )
            for r in rows
        ]  # fmt: skip

    async def principal_for_user(self, name: str, serial: str) -> Principal | None:
        """The enabled user a client certificate names, unless that certificate was revoked."""
        row = await _one(
            self._reader,
            "SELECT name, groups FROM users WHERE name = ? AND disabled = 0 "
            "AND NOT EXISTS (SELECT 1 FROM revoked_certificates WHERE serial = ?)",
            [name, serial],
        )
        return None if row is None else Principal(name=row[0], groups=frozenset(json.loads(row[1])))

    async def get_user(self, name: str) -> UserInfo | None:
        row = await _one(
            self._reader,
            "SELECT name, groups, disabled, created_at, managed_by FROM users WHERE name = ?",
            [name],
        )
        if row is None:
            return None
        return UserInfo(
            row[0], tuple(sorted(json.loads(row[1]))), bool(row[2]), from_ms(row[3]), row[4]
        )

    async def user_groups(self, name: str) -> frozenset[str] | None:
        row = await _one(self._reader, "SELECT groups FROM users WHERE name = ?", [name])
        return None if row is None else frozenset(json.loads(row[0]))

    async def commands_after(self, agent: str, seq: int, limit: int) -> list[Command]:
        # A grant command the agent has refused (acked FAILED or REJECTED) is never sent again:
        # the grant ended here with that ack, and no revoke follows it in the log. An agent that
        # could not record its refusal (a full disk) would otherwise apply it on the replay after
        # its restart, for a grant the coordinator shows as failed.
        rows = await _all(
            self._reader,
            f"SELECT c.seq, c.kind, c.revoke_reason, {_GRANT_COLUMNS_G} "
            "FROM commands c JOIN grants g ON g.id = c.grant_id "
            "WHERE c.agent = ? AND c.seq > ? "
            "AND NOT (c.kind = 'grant' AND c.ack_status IN ('FAILED', 'REJECTED')) "
            "ORDER BY c.seq LIMIT ?",
            [agent, seq, limit],
        )
        return [Command(agent, r[0], CommandKind(r[1]), _grant(r[3:]), r[2]) for r in rows]

    async def first_unacked_seq(self, agent: str) -> int | None:
        row = await _one(
            self._reader,
            # A snapshot's own row is never resent (a new Hello gets a new snapshot), so an ack
            # of it lost in a crash must not hold the resume point back for ever.
            "SELECT MIN(seq) FROM commands WHERE agent = ? AND acked_at IS NULL "
            "AND kind <> 'snapshot'",
            [agent],
        )
        return None if row is None or row[0] is None else int(row[0])

    async def current_policy(self) -> PolicyDocument | None:
        row = await _one(
            self._reader,
            "SELECT yaml, version, sha256, applied_at, applied_by FROM policies "
            "ORDER BY version DESC LIMIT 1",
        )
        if row is None:
            return None
        return PolicyDocument(row[0], row[1], row[2], from_ms(row[3]), row[4])

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
        return [_audit(r) for r in rows]

    async def due_scheduled(self, now: datetime, limit: int) -> list[Request]:
        """SCHEDULED requests whose start has come, earliest first."""
        rows = await _all(
            self._reader,
            f"SELECT {_REQUEST_COLUMNS} FROM {_REQUEST_FROM} WHERE r.state = 'SCHEDULED' "
            "AND r.start_at <= ? ORDER BY r.start_at LIMIT ?",
            [to_ms(now), limit],
        )
        reviews = await _reviews(self._reader, [r[0] for r in rows])
        return [_request(r, reviews.get(r[0], ())) for r in rows]

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
        return [_audit(r) for r in rows]

    async def next_deadline(self) -> datetime | None:
        row = await _one(
            self._reader,
            "SELECT MIN(t) FROM ("
            "SELECT MIN(not_after) AS t FROM grants "
            "WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING') "
            "UNION ALL SELECT MIN(pending_expires_at) FROM requests WHERE state = 'PENDING' "
            "UNION ALL SELECT MIN(start_at) FROM requests WHERE state = 'SCHEDULED')",
        )
        return None if row is None or row[0] is None else from_ms(int(row[0]))

    async def get_meta(self, key: str) -> str | None:
        row = await _one(self._reader, "SELECT value FROM meta WHERE key = ?", [key])
        return None if row is None else str(row[0])

    async def list_locks(self, *, include_ended: bool, now: datetime) -> list[Lock]:
        sql = f"SELECT {_LOCK_COLUMNS} FROM locks"
        args: list[Any] = []
        if not include_ended:
            sql += " WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
            args.append(to_ms(now))
        rows = await _all(self._reader, sql + " ORDER BY created_at DESC, id DESC LIMIT 1000", args)
        return [_lock(r) for r in rows]

    async def lock_in_force(
        self, subject: str, agent: str, action: str, now: datetime
    ) -> Lock | None:
        return await _lock_in_force(self._reader, subject, agent, action, now)


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
    after = _page(page_token)
    if after:
        where.append(f"({alias}created_at, {alias}id) < (?, ?)")
        args.extend(after)
    sql = select + (" WHERE " + " AND ".join(where) if where else "")
    order = f" ORDER BY {alias}created_at DESC, {alias}id DESC LIMIT ?"
    rows = await _all(conn, sql + order, [*args, limit + 1])
    return rows[:limit], len(rows) > limit


def _next_token(items: Sequence[Request] | Sequence[Grant], more: bool) -> str:
    return page_token_after(items[-1]) if more and items else ""


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


# Notifications: the outbox, receivers, deliveries and attempts.

_OUTBOX_COLUMNS = "event_id, kind, at, actor, subject, agent, request_id, grant_id, details"
_OUTBOX_INSERT = (
    f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_OUTBOX_CURSOR = "outbox_routed"


def _route_json(route: Route) -> str:
    return _details_json(
        {
            "kinds": list(route.kinds),
            "labels": dict(route.labels),
            "actions": list(route.actions),
            "rules": list(route.rules),
            "requester": route.requester,
        }
    )


def _route(text: str) -> Route:
    data = json.loads(text)
    return Route(
        kinds=tuple(data.get("kinds", ())),
        labels=dict(data.get("labels", {})),
        actions=tuple(data.get("actions", ())),
        rules=tuple(data.get("rules", ())),
        requester=bool(data.get("requester", False)),
    )


def _notice(row: Sequence[Any]) -> Notice:
    return Notice(
        id=row[0],
        kind=NoticeKind(row[1]),
        at=from_ms(row[2]),
        actor=row[3],
        subject=row[4],
        agent=row[5],
        request_id=row[6],
        grant_id=row[7],
        details=json.loads(row[8]),
    )


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
                _at(r[6]),
                _at(r[7]) if r[4] == "PENDING" else None,
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
