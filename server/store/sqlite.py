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

from jitmesh.clock import Clock, from_ms, to_ms
from jitmesh.types import (
    AuditEvent,
    GrantState,
    RequestState,
)
from server.domain.audit import GENESIS
from server.domain.lifecycle import DUE_GRANT_STATES, REQUEST_TRANSITIONS
from server.domain.models import (
    NO_CHANGE,
    Checkpoint,
    CommandKind,
    GrantChange,
    Moved,
)
from server.domain.notices import Notice
from server.domain.receivers import (
    AttemptRecord,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    ReceiverKind,
    ReceiverSpec,
)
from server.store import queries
from server.store import rows as rec
from server.store.base import SqlStoreReads, SqlTx, grant_sets

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
# Bytes the WAL's file is cut down to when a write restarts it after a complete checkpoint.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

_D = queries.SQLITE_DIALECT
_GRANT_COLUMNS = queries.GRANT_COLUMNS
_AUDIT_COLUMNS = queries.AUDIT_COLUMNS
_LOCK_COLUMNS = queries.LOCK_COLUMNS


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
        # After a checkpoint that reached the WAL's end, the next write restarts the WAL and
        # cuts its file down to this size (without it the file never shrinks: 357 MB seen).
        f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}",
    ):
        await db.execute(pragma)
    return db


def _checkpoint(path: Path, mode: str = "PASSIVE") -> bool:
    """PASSIVE copies what no reader still needs and never waits for readers or the writer.
    TRUNCATE (when the store is idle) waits for them (up to the busy timeout), copies all of the
    WAL and cuts its file to zero bytes. True when the whole WAL was copied."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            busy, frames, copied = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        # The WAL only grows until the next checkpoint succeeds; nothing is lost.
        log.warning("WAL checkpoint failed: %s", exc)
        return False
    return not busy and frames == copied


# Each read is one call on the connection's thread (execute and fetch all rows together), never
# a cursor held open across awaits: an open statement holds the connection's read snapshot, and
# another coroutine's read on the same connection in between would see that older snapshot
# (a request committed a moment ago reads back as missing). One thread hop instead of three, too.
async def _one(conn: Connection, sql: str, args: Iterable[Any] = ()) -> Any:
    rows = await conn.execute_fetchall(sql, tuple(args))
    return next(iter(rows), None)


async def _all(conn: Connection, sql: str, args: Iterable[Any] = ()) -> list[Any]:
    return list(await conn.execute_fetchall(sql, tuple(args)))


async def _audit_head(conn: Connection) -> tuple[int, str]:
    row = await _one(conn, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    return (0, GENESIS) if row is None else (int(row["seq"]), str(row["hash"]))


class SqliteTx(SqlTx):
    """One write transaction. Methods that change state by compare-and-set return False when the
    row was not in the expected state, so the caller decides what that means."""

    _d = _D
    _q = queries.SQLITE

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

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await _one(self._conn, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await _all(self._conn, sql, args)

    async def _run(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self._conn.execute(sql, args)
        return cur.rowcount

    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.executemany(sql, rows)

    async def _advance_seqs(self, wanted: dict[str, int]) -> dict[str, int]:
        rows = await _all(
            self._conn,
            "UPDATE agents SET last_seq = last_seq + w.value FROM json_each(?) AS w "
            "WHERE agents.name = w.key AND agents.removed_at IS NULL "
            "RETURNING agents.name, agents.last_seq",
            [json.dumps(wanted)],
        )
        return {r["name"]: int(r["last_seq"]) for r in rows}

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

    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, change: GrantChange = NO_CHANGE
    ) -> list[Moved]:
        """Compare-and-set up to `limit` grants past their not_after that may still expire
        (PENDING_DELIVERY, ACTIVE, REVOKING) to `state`, set-based: one UPDATE ... RETURNING per
        state left, no row read into Python before it moves."""
        sets, args = grant_sets(_D, list(_DUE_GRANT_STATES), state, change)
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


# Grant states the expiry sweep moves, in the order it takes them.
_DUE_GRANT_STATES = DUE_GRANT_STATES
_DUE_GRANT_IN = queries.DUE_GRANT_IN
# Commits between WAL checkpoints (each commit adds a few pages to the WAL).
CHECKPOINT_EVERY = 200
# Seconds without a commit after which the WAL is checkpointed with TRUNCATE (its file emptied).
IDLE_CHECKPOINT_AFTER = 10.0


# Ids per statement in batched updates and lookups (well under SQLite's variable limit).
_CHUNK = queries.SQLITE_CHUNK


class SqliteStore(SqlStoreReads):
    _d = _D
    _q = queries.SQLITE

    def __init__(self, path: Path, writer: Connection, reader: Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()
        self._commits = 0
        self._checkpointing: asyncio.Task[bool] | None = None
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

    async def truncate_when_idle(self, clock: Clock, idle: float = IDLE_CHECKPOINT_AFTER) -> None:
        """Run while the coordinator serves: once no write has committed for `idle` seconds
        (after writes, and once at start), checkpoint the WAL with TRUNCATE, so the WAL's file
        goes back to zero bytes between bursts instead of staying at its largest (PASSIVE
        checkpoints under load copy pages but never shrink the file)."""
        truncated_at = -1
        while True:
            seen = self._commits
            await clock.sleep(idle)
            if self._commits != seen or seen == truncated_at:
                continue
            async with self._lock:
                # No transaction can start while it runs (it would wait on the busy timeout).
                done = await asyncio.to_thread(_checkpoint, self.path, "TRUNCATE")
            if done:
                truncated_at = seen
                log.debug("WAL truncated while idle")

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

    # Reads: committed data only (the rest in SqlStoreReads).

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await _one(self._reader, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await _all(self._reader, sql, args)

    async def audit_head(self) -> tuple[int, str]:
        return await _audit_head(self._reader)

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        async with self.transaction() as tx:
            await tx._conn.execute(
                "INSERT INTO checkpoints (seq, hash, at, key_id, signature) VALUES (?,?,?,?,?)",
                (checkpoint.seq, checkpoint.hash, to_ms(checkpoint.at), checkpoint.key_id,
                 checkpoint.signature),
            )  # fmt: skip


# Notifications: the outbox, receivers, deliveries and attempts (helpers shared by both stores
# in rows.py).

_OUTBOX_COLUMNS = rec.OUTBOX_COLUMNS
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
