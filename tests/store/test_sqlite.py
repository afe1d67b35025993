"""What only the SQLite store promises (or can be tested only on it): its schema and WAL mode,
cancel-safety of its one writer connection, a COMMIT that SQLite itself rolls back, and
tampering through the database file behind the store's back."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jitmesh.clock import FakeClock
from server.domain.audit import verify_chain
from server.domain.models import AuditEntry, ObservedKind
from server.store import sqlite as sqlite_store
from server.store.sqlite import MIGRATIONS, SqliteStore
from tests.server.helpers import T0, raw_sql
from tests.store.test_contract import enroll


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "store.db")
    try:
        yield opened
    finally:
        await opened.close()


async def test_migrations_are_idempotent_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    first = await SqliteStore.open(path)
    await enroll(first, "web-1")
    await first.close()
    schema = raw_sql(path, "SELECT name, sql FROM sqlite_master ORDER BY name")
    for _ in range(2):
        again = await SqliteStore.open(path)
        assert (await again.get_agent("web-1")) is not None
        await again.close()
    assert raw_sql(path, "SELECT name, sql FROM sqlite_master ORDER BY name") == schema
    assert raw_sql(path, "PRAGMA journal_mode") == [("wal",)]
    # Each migration applied exactly once, and the data survived.
    migrations = len(list(MIGRATIONS.glob("*.sql")))
    assert raw_sql(path, "SELECT COUNT(*) FROM _yoyo_migration") == [(migrations,)]
    assert raw_sql(path, "SELECT name FROM agents") == [("web-1",)]


async def test_stored_tampering_is_found(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "c.db")
    try:
        async with store.transaction() as tx:
            for i in range(5):
                await tx.audit(
                    AuditEntry(ObservedKind("test.event"), "alice", T0, details={"i": str(i)})
                )
        raw_sql(tmp_path / "c.db", "UPDATE audit SET actor = 'mallory' WHERE seq = 3")
        result = verify_chain(await store.audit_chain(0, 100))
        assert (result.ok, result.first_bad_seq) == (False, 3)
    finally:
        await store.close()


async def test_a_cancelled_caller_never_leaves_the_writer_inside_a_transaction(
    store: SqliteStore,
) -> None:
    """A caller cancelled at any await of its transaction (a stream closing mid-call): the
    transaction is rolled back or committed whole, and the next one starts clean."""
    for steps in range(12):

        async def write(n: int = steps) -> None:
            async with store.transaction() as tx:
                await tx.set_meta(f"k{n}", "v")
                await tx.set_meta(f"k{n}b", "v")

        task = asyncio.create_task(write())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with store.transaction() as tx:  # would fail: "cannot start a transaction..."
            await tx.set_meta("after", str(steps))
        first, second = await store.get_meta(f"k{steps}"), await store.get_meta(f"k{steps}b")
        assert (first, second) in {(None, None), ("v", "v")}  # all or nothing
        assert await store.get_meta("after") == str(steps)


async def test_a_commit_that_fails_leaves_the_audit_head_where_it_was(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COMMIT that fails on a full disk or an I/O error (SQLite then rolls the transaction back
    by itself, so none is open afterwards) stored nothing: the chain's head must not move, or
    every later event would chain onto entries that do not exist. The failing COMMIT is faked
    (the real one needs the coordinator's own disk to fill); the rollback is SQLite's own."""
    async with store.transaction() as tx:
        await tx.audit(AuditEntry(ObservedKind("test.event"), "alice", T0, details={"i": "0"}))
    head = await store.audit_head()

    def commit_fails(writer: Any) -> None:
        # On the writer's thread, where the store commits.
        writer._conn.execute("ROLLBACK")  # what SQLite does itself on SQLITE_IOERR / SQLITE_FULL
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_store, "_commit", commit_fails)
    with pytest.raises(sqlite3.OperationalError):
        async with store.transaction() as tx:
            await tx.audit(
                AuditEntry(ObservedKind("test.event"), "alice", T0, details={"i": "lost"})
            )
    monkeypatch.undo()
    assert await store.audit_head() == head
    async with store.transaction() as tx:
        await tx.audit(AuditEntry(ObservedKind("test.event"), "bob", T0, details={"i": "1"}))
    events = await store.audit_chain(0, 100)
    assert [e.details["i"] for e in events] == ["0", "1"]
    assert verify_chain(events).ok


async def test_a_writer_cancelled_at_any_step_leaves_the_store_and_chain_sound(
    store: SqliteStore,
) -> None:
    # A stream handler's task is cancelled when its call ends, at whatever await it is: in
    # BEGIN, in a statement, in COMMIT. Statements already queued still run on the connection's
    # thread, so no transaction may be left open and the chain head must follow what committed.
    async def write(i: int) -> None:
        async with store.transaction() as tx:
            await tx.audit(AuditEntry(ObservedKind("cancelled.maybe"), "a", T0, id=f"evt-{i}"))

    for i in range(40):
        task = asyncio.ensure_future(write(i))
        for _ in range(i % 8):
            await asyncio.sleep(0)  # lets the cancel land at a different step each time
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with store.transaction() as tx:
            await tx.audit(AuditEntry(ObservedKind("after"), "a", T0, id=f"evt-after-{i}"))
    chain = await store.audit_chain(0, 1000)
    assert verify_chain(chain).ok
    assert await store.audit_head() == (chain[-1].seq, chain[-1].hash)
    assert sum(e.kind == "after" for e in chain) == 40


async def test_deferred_statements_run_in_order_with_the_next_one_and_never_after_a_rollback(
    store: SqliteStore,
) -> None:
    """What the writer defers (no result needed) runs in the same trip as the next statement,
    before it, or with COMMIT; a rollback drops it; its error fails the transaction."""
    writer = store._writer
    assert isinstance(writer, sqlite_store._Writer)
    async with store.transaction() as tx:
        writer.defer("INSERT INTO meta (key, value) VALUES ('a', '1')")
        writer.defer("UPDATE meta SET value = '2' WHERE key = 'a'")
        assert await tx.get_meta("a") == "2"  # seen by the next statement, in order
        assert writer.deferred == 0
        writer.defer("INSERT INTO meta (key, value) VALUES ('b', '1')")
    assert await store.get_meta("b") == "1"  # committed with COMMIT

    async def caller_fails() -> None:
        async with store.transaction():
            writer.defer("INSERT INTO meta (key, value) VALUES ('c', '1')")
            raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError):
        await caller_fails()
    assert writer.deferred == 0
    assert await store.get_meta("c") is None

    async def deferred_fails() -> None:
        async with store.transaction() as tx:
            await tx.set_meta("d", "1")
            writer.defer("INSERT INTO meta (key, value) VALUES ('a', 'again')")  # key taken

    with pytest.raises(sqlite3.IntegrityError):
        await deferred_fails()
    assert await store.get_meta("d") is None  # all or nothing
    async with store.transaction() as tx:  # and the writer is sound afterwards
        await tx.set_meta("e", "1")
    assert await store.get_meta("e") == "1"


async def test_the_wal_is_emptied_once_writes_stop(tmp_path: Path) -> None:
    """A burst grows the WAL (its periodic PASSIVE checkpoints copy pages but never shrink the
    file); once no write has committed for the idle time, a TRUNCATE checkpoint empties it, and
    every row is still there. (Issue 10, item 13: the WAL had reached 357 MB.)"""
    path = tmp_path / "c.db"
    wal = path.with_name(path.name + "-wal")
    store = await SqliteStore.open(path)
    clock = FakeClock()
    idle = asyncio.create_task(store.truncate_when_idle(clock, idle=10.0))
    try:
        for batch in range(60):
            async with store.transaction() as tx:
                for i in range(20):
                    details = {"batch": str(batch), "i": str(i), "pad": "x" * 4000}
                    await tx.audit(
                        AuditEntry(ObservedKind("test.burst"), "alice", T0, details=details)
                    )
        burst = wal.stat().st_size
        assert burst > 4 * 1024 * 1024
        # The loop looks every idle period: the first look saw the burst's commits, the next
        # one sees none since, and truncates.
        async with asyncio.timeout(20):
            while wal.stat().st_size > 0:
                await clock.advance(timedelta(seconds=10))
                await asyncio.sleep(0.01)
        assert raw_sql(path, "SELECT COUNT(*) FROM audit WHERE kind = 'test.burst'") == [(1200,)]
        # Writes go on after it, and the WAL grows again from nothing.
        async with store.transaction() as tx:
            await tx.audit(AuditEntry(ObservedKind("test.after"), "alice", T0))
        assert 0 < wal.stat().st_size < burst
    finally:
        idle.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await idle
        await store.close()


def wal_restarts(wal: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time a write starts the
    WAL over from its first frame (0 while it has only ever grown)."""
    with wal.open("rb") as f:
        header = f.read(16)
    return int.from_bytes(header[12:16], "big") if len(header) == 16 else 0


async def test_the_wal_starts_over_under_steady_writes_and_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes with reads going on beside them, never idle: the WAL still starts over once it
    holds more than WAL_RESTART_FRAMES, so a coordinator killed under load leaves a short WAL
    to read again at its next start. Before, the periodic checkpoints copied it all but the
    write that would start it over nearly always found a reader on an older snapshot: it grew
    without end (1.37 GB beside a 105 MB database after 10,000 agents and 20,000 grants)."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 20)
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_FRAMES", 100)
    path = tmp_path / "c.db"
    wal = path.with_name(path.name + "-wal")
    store = await SqliteStore.open(path)
    reading = True

    async def reader() -> None:
        while reading:
            await store.audit_head()

    reads = asyncio.create_task(reader())
    written = 0
    try:
        async with asyncio.timeout(30):
            while wal_restarts(wal) == 0:
                async with store.transaction() as tx:
                    for i in range(5):
                        details = {"n": str(written), "i": str(i), "pad": "x" * 500}
                        await tx.audit(
                            AuditEntry(ObservedKind("test.steady"), "alice", T0, details=details)
                        )
                written += 1
        assert written > sqlite_store.CHECKPOINT_EVERY
        async with store.transaction() as tx:
            await tx.audit(AuditEntry(ObservedKind("test.after"), "alice", T0))
    finally:
        reading = False
        await reads
        await store.close()
    # Nothing was lost on the way, and the chain is whole.
    assert raw_sql(path, "SELECT COUNT(*) FROM audit WHERE kind = 'test.steady'") == [
        (written * 5,)
    ]
    reopened = await SqliteStore.open(path)
    try:
        assert verify_chain(await reopened.audit_chain(0, 100_000)).ok
    finally:
        await reopened.close()
