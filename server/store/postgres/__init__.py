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
    AuditEvent,
    GrantState,
    RequestState,
)
from server.domain.audit import GENESIS
from server.domain.errors import Conflict
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
_GRANT_COLUMNS = queries.GRANT_COLUMNS
_AUDIT_COLUMNS = queries.AUDIT_COLUMNS
_LOCK_COLUMNS = queries.LOCK_COLUMNS
_DUE_GRANT_STATES = DUE_GRANT_STATES


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


class PostgresTx(SqlTx):
    """One write transaction on one pooled connection."""

    _d = _D
    _q = queries.POSTGRES

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

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await _one(self._conn, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await _all(self._conn, sql, args)

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

    async def move_due_grants(
        self, now: datetime, limit: int, *, state: GrantState, change: GrantChange = NO_CHANGE
    ) -> list[Moved]:
        """Up to `limit` due grants to `state`. Rows another replica's sweep holds are skipped
        (SKIP LOCKED): that sweep moves them."""
        sets, args = grant_sets(_D, list(_DUE_GRANT_STATES), state, change)
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


class PostgresStore(SqlStoreReads):
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

    # Each read statement on any pooled connection (autocommit: a statement sees what was
    # committed when it started, on one connection or several alike).

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        async with self._pool.connection() as conn:
            return await _one(conn, sql, args)

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        async with self._pool.connection() as conn:
            return await _all(conn, sql, args)

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
