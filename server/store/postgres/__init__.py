"""The PostgreSQL store (psycopg 3 with psycopg_pool): the coordinator's store when several
replicas share one database. The same contract as the SQLite store (tests/store/); the
statements and code both stores share are in server/store/queries.py and base.py, and here is
what only PostgreSQL does.

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
from jitmesh.types import AuditEvent
from server.domain.audit import GENESIS
from server.domain.errors import Conflict, Unavailable
from server.domain.models import CommandKind
from server.store import queries
from server.store.base import SqlOutbox, SqlReads, SqlStore, SqlTx, bucket_args

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

_D = queries.POSTGRES_DIALECT


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


class PostgresReads(SqlReads):
    """Reads on one pooled connection."""

    _d = _D
    _q = queries.POSTGRES

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await _one(self._conn, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await _all(self._conn, sql, args)


class PostgresTx(PostgresReads, SqlTx):
    """One write transaction on one pooled connection."""

    _d = _D
    _q = queries.POSTGRES
    # Replicas sweeping at the same moment never wait for each other, never move a row twice.
    _take_due = " FOR UPDATE SKIP LOCKED"
    # A lock's lift and its handout steps take turns on the lock row (domain/locks.py), not only
    # behind the audit head (`head_first`, which may be turned off).
    _hold_row = " FOR UPDATE"

    def __init__(self, conn: Conn, replica: str = "") -> None:
        self._conn = conn
        self._replica = replica
        self._head: tuple[int, str] | None = None
        self.new_audit: list[AuditEvent] = []

    async def _budget_turn(self, subject: str, rule: str) -> None:
        # Replicas checking the same budget take turns until commit (READ COMMITTED would let
        # two transactions both read the budget unused and both write a grant).
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"budget:{subject}:{rule}"]
        )

    async def _audit_head(self) -> tuple[int, str]:
        if self._head is None:
            row = await _one(self._conn, "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            self._head = (0, GENESIS) if row is None else (int(row["seq"]), str(row["hash"]))
        return self._head

    async def _run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return await _rowcount(self._conn, sql, args)

    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            async with self._conn.cursor() as cur:
                await cur.executemany(sql, rows)

    async def _advance_seqs(self, wanted: dict[str, int]) -> dict[str, int]:
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
        return {r["name"]: int(r["last_seq"]) for r in rows}

    async def _set_revoke_seqs(self, by_grant: dict[str, int]) -> None:
        if by_grant:
            await self._conn.execute(
                "UPDATE grants SET revoke_seq = u.seq FROM unnest(%s::text[], %s::bigint[]) "
                "AS u(id, seq) WHERE grants.id = u.id",
                [list(by_grant), list(by_grant.values())],
            )

    async def _audit_added(self, events: list[AuditEvent]) -> None:
        assert self._head is not None
        await self._conn.execute(
            "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", list(self._head)
        )
        # Watchers on the other replicas (request watch, audit tail) learn of it at commit.
        ids = sorted({e.request_id for e in events if e.request_id})
        listed = ",".join(ids) if sum(len(i) + 1 for i in ids) < NOTIFY_PAYLOAD else "*"
        await self._conn.execute(
            "SELECT pg_notify(%s, %s)",
            [AUDIT_CHANNEL, f"{self._replica}|{events[-1].seq}|{listed}"],
        )

    async def _commands_added(self, agents: Iterable[str]) -> None:
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

    async def insert_policy(self, text: str, sha256: str, at: datetime, by: str) -> int:
        # Versions are numbered in one order across replicas.
        await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", [_POLICY_LOCK])
        return await super().insert_policy(text, sha256, at, by)

    # Sweeps.


class PostgresStore(SqlStore):
    _d = _D
    _q = queries.POSTGRES

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
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        migrate_now: bool = True,
        pool_timeout: float = 30.0,
    ) -> PostgresStore:
        """`pool_timeout`: the longest a call waits for a free pooled connection before it fails as
        `Unavailable`."""
        if migrate_now:
            await migrate(dsn)
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="jitmesh",
        )
        await pool.open(wait=True, timeout=30)
        return cls(pool, dsn)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection. The database unreachable, or no connection free within the
        pool's timeout (a burst: thousands of agents saying Hello at once), is `Unavailable`
        with nothing changed; the connection lost once the call had it (a change may have been
        committed) is `Unavailable` saying so. Never an unexpected exception with its
        traceback in the log. Serialization failures and deadlocks pass through (`write`
        retries them)."""
        got = False
        try:
            async with self._pool.connection() as conn:
                got = True
                yield conn
        except _RETRYABLE:
            raise
        except psycopg.OperationalError as exc:  # PoolTimeout is one too
            if got:
                raise Unavailable(
                    "the connection to the coordinator's database failed during the call "
                    f"({type(exc).__name__}): a change may or may not have been made; check "
                    "before trying again"
                ) from exc
            raise Unavailable(
                "the coordinator's database is unreachable or too busy "
                f"({type(exc).__name__}); nothing was changed, try again"
            ) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        """One write transaction, run once: a serialization failure or deadlock is reported as
        `Conflict` ("try again"); `write` retries instead."""
        began = time.monotonic()
        try:
            async with self._connection() as conn, conn.transaction():
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
                async with self._connection() as conn, conn.transaction():
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

    @asynccontextmanager
    async def _short_write(self) -> AsyncIterator[PostgresTx]:
        async with self._connection() as conn, conn.transaction():
            yield PostgresTx(conn, self.replica)

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
            except (psycopg.Error, Unavailable) as exc:
                # The database restarting, or a pooled connection found dead on the way back:
                # listen again (a replica never stops for it; the log is re-read on reconnect).
                log.warning("command notifications interrupted, listening again: %s", exc)
                await asyncio.sleep(1.0)

    # Reads: committed data only.

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Conn]:
        async with self._connection() as conn:
            yield conn

    # A read on any pooled connection (autocommit: each statement sees what was committed when
    # it started); reads of several statements borrow one connection for all (_session).

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[SqlReads]:
        async with self._connection() as conn:
            yield PostgresReads(conn)

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        async with self._connection() as conn:
            return await _one(conn, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        async with self._connection() as conn:
            return await _all(conn, sql, args)

    async def take_token(
        self, limiter: str, caller: str, rate: float, burst: int, at: datetime
    ) -> int:
        # One statement in autocommit: one trip, no transaction of its own, and never behind
        # the audit head's lock (the upsert's row lock orders replicas taking from one bucket).
        args = bucket_args(limiter, caller, rate, burst, at)
        row = await self._one(self._q.take_token, args)
        return int(row["refusals"])

    async def audit_head(self) -> tuple[int, str]:
        async with self._read() as conn:
            row = await _one(conn, "SELECT seq, hash FROM audit_head WHERE id = 1")
        return (0, GENESIS) if row is None else (int(row["seq"]), str(row["hash"]))


class PostgresOutbox(SqlOutbox):
    """The sender's side of the outbox (SqlOutbox). Senders on several replicas share the work:
    routing moves one cursor by compare-and-set under the cursor row's lock, and deliveries are
    claimed with FOR UPDATE SKIP LOCKED."""

    _cursor_sql = queries.POSTGRES.get_meta + " FOR UPDATE"
    _claim_sql = (
        "UPDATE deliveries SET claimed_until = %s WHERE (event_seq, receiver) IN "
        "(SELECT event_seq, receiver FROM deliveries WHERE state = 'PENDING' "
        "AND next_at <= %s AND claimed_until <= %s ORDER BY next_at LIMIT %s "
        "FOR UPDATE SKIP LOCKED) RETURNING event_seq, receiver, attempts"
    )


from .importer import import_sqlite  # noqa: E402  (uses `migrate` above)

__all__ = [
    "PostgresOutbox",
    "PostgresStore",
    "PostgresTx",
    "import_sqlite",
    "migrate",
    "with_schema",
]
