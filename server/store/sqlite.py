"""The SQLite store (aiosqlite, WAL). The statements and code it shares with the PostgreSQL store
are in server/store/queries.py and base.py; here is what only SQLite does.

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
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from yoyo import get_backend, read_migrations

from jitmesh.clock import Clock, from_ms, to_ms
from jitmesh.types import AuditEvent, Request
from server.domain.audit import GENESIS
from server.domain.models import (
    CommandKind,
)
from server.store import queries
from server.store import rows as rec
from server.store.base import SqlOutbox, SqlStore, SqlTx

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
# Bytes the WAL's file is cut down to when a write restarts it after a complete checkpoint.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

_D = queries.SQLITE_DIALECT


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


class _Writer(aiosqlite.Connection):
    """The writing connection. A statement whose result nobody needs (`defer`) waits, and runs
    on the connection's thread in the same trip as the next statement or COMMIT: a transaction
    of ten statements made ten trips (each one a thread hand-off both ways, 45 us or more, and
    a turn of the event loop, while holding the write lock); now only the statements whose
    result is needed make one. Every statement and cursor of aiosqlite goes through `_execute`,
    so whatever runs next on this connection runs after what was deferred: order is kept, and
    an error of a deferred statement surfaces at that next statement (the transaction then
    rolls back as for any error in it). `discard` drops what waits (before a rollback)."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        self._deferred: list[tuple[str, Sequence[Any], bool]] = []

    def defer(self, sql: str, args: Sequence[Any] = (), *, many: bool = False) -> None:
        self._deferred.append((sql, args, many))

    def discard(self) -> None:
        self._deferred.clear()

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    @property
    def beginning(self) -> bool:
        """A transaction's BEGIN waits to go with the next trip: that trip is its first."""
        return bool(self._deferred) and self._deferred[0][0] == "BEGIN IMMEDIATE"

    async def fetch_each(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """All rows of each statement, in one trip (after what was deferred)."""

        def each() -> list[list[Any]]:
            return [self._conn.execute(sql, args).fetchall() for sql, args in statements]

        return await self._execute(each)

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._deferred:
            return await super()._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call,no-any-return]
        deferred, self._deferred = self._deferred, []

        def deferred_first() -> T:
            conn = self._conn
            for sql, params, many in deferred:
                if many:
                    conn.executemany(sql, params)
                else:
                    conn.execute(sql, params)
            return fn(*args, **kwargs)

        return await super()._execute(deferred_first)  # type: ignore[no-untyped-call,no-any-return]


async def _connect(path: Path, *, writer: bool = False) -> Connection:
    if writer:
        db: Connection = _Writer(lambda: sqlite3.connect(path, isolation_level=None), 64)
        await db
    else:
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


def _commit(writer: _Writer) -> None:
    """On the writer's thread, after what was deferred: COMMIT."""
    conn = writer._conn
    if conn.in_transaction:
        conn.execute("COMMIT")


async def _rollback(writer: _Writer) -> None:
    """Drop what waits, then roll back if a transaction is open. Decided on the writer's
    thread, after every statement queued before (a cancelled caller's last statement, and the
    BEGIN it carried, may still be on its way): deciding here, before they ran, left the
    connection inside a transaction behind a released lock."""
    writer.discard()

    def rollback() -> None:
        conn = writer._conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    await _to_the_end(writer._execute(rollback))


def _peek(path: Path) -> sqlite3.Connection:
    """A read-only connection used inline on the event loop, for single-row reads by primary
    key only (the identity generation, checked on every operator call). Such a read takes
    about 10 us here against 45 us or more for a hop to aiosqlite's thread, and it cannot wait
    on a disk write: in WAL mode a reader never waits for the writer, and the page is cached.
    The short busy timeout bounds the rare case (a WAL being reset) that can: the caller then
    reads through aiosqlite instead."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=50")
    db.execute("PRAGMA query_only=1")
    return db


def _checkpoint(path: Path, mode: str = "PASSIVE", wait_ms: int = 5000) -> tuple[bool, int]:
    """PASSIVE copies what no reader still needs and never waits for readers or the writer.
    RESTART (under the write lock, when the WAL has grown) and TRUNCATE (when the store is idle)
    wait for them (up to `wait_ms`) and copy all of the WAL, so that the next write starts it
    over; TRUNCATE also cuts its file to zero bytes. Returns whether the whole WAL was copied,
    and how many frames (pages) it holds."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
            busy, frames, copied = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        # The WAL only grows until the next checkpoint succeeds; nothing is lost.
        log.warning("WAL checkpoint failed: %s", exc)
        return False, 0
    return not busy and frames == copied, max(int(frames), 0)


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
    return (0, GENESIS) if row is None else _head_of(row)


def _head_of(row: Any) -> tuple[int, str]:
    return int(row["seq"]), str(row["hash"])


class SqliteTx(SqlTx):
    """One write transaction. Methods that change state by compare-and-set return False when the
    row was not in the expected state, so the caller decides what that means."""

    _d = _D
    _q = queries.SQLITE
    _take_due = ""
    _hold_row = ""  # the one writer holds every row already

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
        rows = await self._all(sql, args)
        return rows[0] if rows else None

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        if self._head is None and self._writer.beginning:
            # The transaction's first trip (its BEGIN goes with it) reads the audit chain's
            # head too: nearly every transaction audits, and the head is then one trip less.
            # Read under the write lock that BEGIN takes; only audit_many adds events after.
            rows, head = await self._writer.fetch_each([(sql, args), (self._q.audit_head, ())])
            self._head = (0, GENESIS) if not head else _head_of(head[0])
            return rows
        return await _all(self._conn, sql, args)

    async def _run(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self._conn.execute(sql, args)
        return cur.rowcount

    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._writer.defer(sql, rows, many=True)

    async def _later(self, sql: str, args: Sequence[Any] = ()) -> None:
        self._writer.defer(sql, args)

    @property
    def _writer(self) -> _Writer:
        writer = self._conn
        assert isinstance(writer, _Writer)
        return writer

    async def _fetch_each(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        return await self._writer.fetch_each(statements)

    async def get_request(self, request_id: str) -> Request | None:
        # The request and its reviews in one trip; on the transaction's first trip the audit
        # chain's head too, as `_all` does.
        statements: list[tuple[str, Sequence[Any]]] = [
            (self._q.get_request, [request_id]),
            (self._q.reviews_of_request, [request_id]),
        ]
        if self._head is None and self._writer.beginning:
            statements.append((self._q.audit_head, ()))
        rows, reviews, *head = await self._writer.fetch_each(statements)
        if head:
            self._head = (0, GENESIS) if not head[0] else _head_of(head[0][0])
        if not rows:
            return None
        return rec.request(rows[0], rec.reviews_by_request(reviews).get(request_id, ()))

    async def _head_and_stored_ids(self, ids: Sequence[str]) -> tuple[tuple[int, str], set[str]]:
        # Both in one trip (the head first, under the write lock the trip's BEGIN takes).
        statements: list[tuple[str, Sequence[Any]]] = []
        if self._head is None:
            statements.append((self._q.audit_head, ()))
        for chunk in self._d.chunks(ids):
            statements.append(
                (
                    f"SELECT id FROM audit WHERE {self._d.in_list('id', chunk)}",
                    self._d.in_args(chunk),
                )
            )
        results = await self._writer.fetch_each(statements)
        if self._head is None:
            head = results.pop(0)
            self._head = (0, GENESIS) if not head else _head_of(head[0])
        return self._head, {row["id"] for rows in results for row in rows}

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
            rows = await self._all(
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
        await self._many(
            "UPDATE agents SET last_acked_seq = MAX(last_acked_seq, ?), last_seen_at = ? "
            "WHERE name = ?",
            [(seq, when, agent) for agent, seq in highest.items()],
        )
        return done


# Commits between WAL checkpoints (each commit adds a few pages to the WAL).
CHECKPOINT_EVERY = 200
# Frames (pages of 4 KiB) past which a checkpoint makes the WAL start over, under the write lock
# (see `SqliteStore._checkpoint`); and how long that one waits for reads begun before it.
WAL_RESTART_FRAMES = WAL_SIZE_LIMIT // 4096
WAL_RESTART_WAIT_MS = 100
# Seconds without a commit after which the WAL is checkpointed with TRUNCATE (its file emptied).
IDLE_CHECKPOINT_AFTER = 10.0


# Ids per statement in batched updates and lookups (well under SQLite's variable limit).
_CHUNK = queries.SQLITE_CHUNK


class SqliteStore(SqlStore):
    _d = _D
    _q = queries.SQLITE

    def __init__(
        self, path: Path, writer: Connection, reader: Connection, peek: sqlite3.Connection
    ):
        self.path = path
        self._writer = writer
        self._reader = reader
        # Read inline on the event loop, for one value only: `identity_generation`.
        self._peek = peek
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
        writer = await _connect(path, writer=True)
        reader = await _connect(path)
        return cls(path, writer, reader, _peek(path))

    async def _checkpoint(self) -> bool:
        """Copy the WAL back into the database, on a worker thread and beside the writes; True
        when all of it was copied.

        SQLite starts the WAL over (from its first byte; `journal_size_limit` then cuts the file
        down) only at a write that finds all of it copied. Under steady writes no checkpoint run
        beside them ever copies all of it (commits add frames while it copies), so the WAL grew
        without end: 1.37 GB beside a 105 MB database after 10,000 agents connected and 20,000
        grants, and 250 MB after 6,000 small commits. A coordinator killed then reads all of it
        again at its next start (SQLite rebuilds the WAL's index from the file: 0.8-0.9 s of
        CPU for those 1.37 GB, half of that start; docs/performance.md, "Coordinator start").
        A complete copy is not enough: the write that would start the WAL over must also find
        no reader still on a snapshot that needs it, and with reads going on all the time (the
        reader connection, the identity check) one nearly always is. So once the WAL holds more
        than WAL_RESTART_FRAMES, a RESTART checkpoint runs under the write lock, where no
        commit can add frames: it copies what the first pass left (the few commits written
        meanwhile), waits for the reads that began before it to end (those that begin after it
        read the database file alone), and syncs; the next write then starts the WAL over.
        Writes wait for it: 25-50 ms measured, once per 64 MiB of WAL. A read that takes longer
        than WAL_RESTART_WAIT_MS (an export of a long range) makes it give up rather than hold
        the writes longer; the next checkpoint tries again."""
        done, frames = await asyncio.to_thread(_checkpoint, self.path)
        if frames <= WAL_RESTART_FRAMES:
            return done
        async with self._lock:
            done, _ = await asyncio.to_thread(
                _checkpoint, self.path, "RESTART", WAL_RESTART_WAIT_MS
            )
        return done

    async def close(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
        self._peek.close()
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
        writer = self._writer
        assert isinstance(writer, _Writer)
        async with self._lock:
            began = time.monotonic()
            try:
                # BEGIN goes with the transaction's first statement (one trip less).
                writer.defer("BEGIN IMMEDIATE")
                tx = SqliteTx(self, writer)
                yield tx
            except BaseException:
                await _rollback(writer)
                raise
            try:
                # With whatever is still deferred, in one trip.
                await _to_the_end(writer._execute(_commit, writer))
            except asyncio.CancelledError:
                # `_to_the_end` raises this only after the statement succeeded: committed, then
                # cancelled.
                self._commits += 1
                raise
            except BaseException:
                # The commit (or a deferred statement before it) failed. SQLite rolls back by
                # itself on an I/O error or a full disk (the transaction is then no longer
                # open); otherwise roll back here.
                await _rollback(writer)
                raise
            self._commits += 1
            if self.observe_transaction is not None:
                self.observe_transaction(time.monotonic() - began)
            if self._commits % CHECKPOINT_EVERY == 0 and (
                self._checkpointing is None or self._checkpointing.done()
            ):
                # Owned by the store and awaited by `close`; it never raises (failures are logged).
                self._checkpointing = asyncio.create_task(self._checkpoint())

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
                done, _ = await asyncio.to_thread(_checkpoint, self.path, "TRUNCATE")
            if done:
                truncated_at = seen
                log.debug("WAL truncated while idle")

    async def write(self, work: Callable[[SqliteTx], Awaitable[T]]) -> T:
        """Run `work` in one write transaction and commit (see `Store.write`). With one writer
        there is no serialization failure to retry: `work` runs once."""
        async with self.transaction() as tx:
            return await work(tx)

    def _short_write(self) -> AbstractAsyncContextManager[SqliteTx]:
        # One writer: the store's own writes take their turn like every other.
        return self.transaction()

    # Reads: committed data only (the rest in SqlStore).

    async def identity_generation(self) -> int:
        sql = self._q.identity_generation
        try:
            # fetchall: the statement is finished (its read snapshot released) before returning.
            rows = self._peek.execute(sql).fetchall()
        except sqlite3.OperationalError:
            rows = list(await self._reader.execute_fetchall(sql))
        return int(rows[0][0]) if rows else 0

    async def _fetch_each(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        # One trip to the reader's thread for all of them.
        conn = self._reader

        def each() -> list[list[Any]]:
            return [conn._conn.execute(sql, args).fetchall() for sql, args in statements]

        rows: list[list[Any]] = await conn._execute(each)  # type: ignore[no-untyped-call]
        return rows

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await _one(self._reader, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await _all(self._reader, sql, args)

    async def audit_head(self) -> tuple[int, str]:
        return await _audit_head(self._reader)


class SqliteOutbox(SqlOutbox):
    """The sender's side of the outbox (SqlOutbox). One writer at a time: nothing to lock."""

    _cursor_sql = queries.SQLITE.get_meta
    _claim_sql = (
        "UPDATE deliveries SET claimed_until = ? WHERE rowid IN (SELECT rowid FROM "
        "deliveries WHERE state = 'PENDING' AND next_at <= ? AND claimed_until <= ? "
        "ORDER BY next_at LIMIT ?) RETURNING event_seq, receiver, attempts"
    )
