"""The SQLite lease store on a real file: persist, reopen, outbox, migrations, read-only check."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.errors import StateError
from agent.domain.leases import EventKind, LeaseState, new_event, tombstone
from agent.store.base import LeaseStore
from agent.store.migrate import MIGRATIONS, migrate, migrate_isolated, pending
from agent.store.readonly import find_allowing
from agent.store.sqlite import SqliteLeaseStore
from jitmesh.clock import to_ms

from .factories import T0, gid, lease, revoke_after

ALL_MIGRATIONS = len(list(MIGRATIONS.glob("*.sql")))

MIN = timedelta(minutes=1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteLeaseStore]:
    # Typed as the interface: mypy checks that the SQLite store implements all of it.
    opened: LeaseStore = SqliteLeaseStore.open(tmp_path)
    assert isinstance(opened, SqliteLeaseStore)
    await opened.claim("web-1", "boot-a")
    yield opened
    opened.close()


def reopen(path: Path) -> SqliteLeaseStore:
    return SqliteLeaseStore.open(path)


async def test_new_store_is_empty_and_in_wal_mode(store: SqliteLeaseStore, tmp_path: Path) -> None:
    meta = await store.meta()
    assert (meta.agent, meta.last_applied_seq, meta.epoch, meta.boot_id) == (
        "web-1",
        0,
        0,
        "boot-a",
    )
    assert meta.last_wall_at is None
    assert await store.active_leases() == []
    db = sqlite3.connect(tmp_path / "agent.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_command_persists_leases_and_sequence_together(tmp_path: Path) -> None:
    store = reopen(tmp_path)
    item = lease(offline=revoke_after(5 * MIN), seq=3)
    await store.record_command(seq=3, epoch=2, writes=[item])
    store.close()

    store = reopen(tmp_path)
    try:
        assert await store.lease(item.grant_id) == item
        assert await store.active_leases() == [item]
        meta = await store.meta()
        assert (meta.last_applied_seq, meta.epoch) == (3, 2)
    finally:
        store.close()


async def test_failed_transaction_leaves_nothing(store: SqliteLeaseStore) -> None:
    good = lease(seq=4)
    broken = lease(seq=2**70)  # SQLite cannot store it: fails after the first insert
    with pytest.raises(OverflowError):
        await store.record_command(seq=4, epoch=1, writes=[good, broken])
    assert await store.lease(good.grant_id) is None
    assert (await store.meta()).last_applied_seq == 0


async def test_snapshot_can_lower_the_last_applied_sequence(store: SqliteLeaseStore) -> None:
    await store.record_command(seq=9, epoch=1, writes=[])
    await store.record_command(seq=4, epoch=1, writes=[])
    assert (await store.meta()).last_applied_seq == 4


async def test_epoch_never_goes_down(store: SqliteLeaseStore) -> None:
    await store.record_command(seq=1, epoch=5, writes=[])
    await store.record_command(seq=2, epoch=3, writes=[])
    await store.note_epoch(4)
    assert (await store.meta()).epoch == 5
    await store.note_epoch(7)
    assert (await store.meta()).epoch == 7


async def test_upsert_overwrites_the_row(store: SqliteLeaseStore) -> None:
    item = lease(seq=1)
    await store.record_command(seq=1, epoch=1, writes=[item])
    later = item.ended(at=T0 + MIN, reason="revoked")
    await store.record_command(seq=2, epoch=1, writes=[later])
    assert await store.lease(item.grant_id) == later
    assert await store.active_leases() == []


async def test_tombstone_round_trips(store: SqliteLeaseStore) -> None:
    row = tombstone(gid(), seq=2, at=T0, reason="revoked")
    await store.record_command(seq=2, epoch=1, writes=[row])
    assert await store.lease(row.grant_id) == row


async def test_leases_by_id_returns_only_known(store: SqliteLeaseStore) -> None:
    a, b = lease(), lease("bob", "ssh")
    await store.record_command(seq=1, epoch=1, writes=[a, b])
    missing = gid()
    assert await store.leases([a.grant_id, missing]) == {a.grant_id: a}


async def test_mark_applied_and_failed_only_touch_active_leases(store: SqliteLeaseStore) -> None:
    item = lease(applied=False)
    await store.record_command(seq=1, epoch=1, writes=[item])
    assert await store.mark_applied(item.grant_id, T0 + MIN)
    stored = await store.lease(item.grant_id)
    assert stored is not None
    assert stored.applied_at == T0 + MIN

    event = new_event(EventKind.GRANT_APPLY_FAILED, at=T0, lease=item)
    assert await store.mark_failed(item.grant_id, T0 + 2 * MIN, "hook failed", event)
    stored = await store.lease(item.grant_id)
    assert stored is not None
    assert (stored.state, stored.remove_reason) == (LeaseState.FAILED, "hook failed")
    # Compare-and-set: a failed lease is not active any more, and no second event is written.
    assert not await store.mark_applied(item.grant_id, T0 + 3 * MIN)
    again = new_event(EventKind.GRANT_APPLY_FAILED, at=T0, lease=item)
    assert not await store.mark_failed(item.grant_id, T0, "again", again)
    assert [e.event_id for e in await store.pending_events(10)] == [event.event_id]


async def test_end_lease_writes_the_end_and_its_event_atomically(store: SqliteLeaseStore) -> None:
    item = lease()
    await store.record_command(seq=1, epoch=1, writes=[item])
    event = new_event(EventKind.GRANT_EXPIRED, at=T0 + MIN, lease=item, details={"while": "down"})
    assert await store.end_lease(item.ended(at=T0 + MIN, reason="expired"), event)
    stored = await store.lease(item.grant_id)
    assert stored is not None
    assert (stored.state, stored.remove_reason) == (LeaseState.REMOVED, "expired")
    assert await store.pending_events(10) == [replace(event, counter=1)]
    # Ending it again changes nothing and adds no event.
    again = new_event(EventKind.GRANT_EXPIRED, at=T0 + MIN, lease=item)
    assert not await store.end_lease(item.ended(at=T0 + MIN, reason="expired"), again)
    assert await store.pending_events(10) == [replace(event, counter=1)]


async def test_outbox_keeps_order_survives_reopen_and_deletes_acked(tmp_path: Path) -> None:
    store = reopen(tmp_path)
    events = [new_event(EventKind.DRIFT_REMOVED, at=T0, pair=("u", f"a{i}")) for i in range(5)]
    for event in events:
        await store.add_event(event)
    await store.add_event(events[0])  # the same id again is not a second event
    store.close()

    store = reopen(tmp_path)
    # Numbered 1, 2, 3, ... in the order written; the repeated id took no number.
    events = [replace(event, counter=i + 1) for i, event in enumerate(events)]
    try:
        assert await store.pending_events(10) == events
        assert await store.pending_events(2) == events[:2]
        assert await store.delete_events([events[0].event_id, events[2].event_id, "nope"]) == 2
        assert await store.pending_events(10) == [events[1], events[3], events[4]]
    finally:
        store.close()


async def test_wall_floor_never_goes_back_and_contact_is_kept(store: SqliteLeaseStore) -> None:
    await store.note_wall(T0 + MIN)
    await store.note_wall(T0)
    await store.note_contact(T0 + 2 * MIN)
    meta = await store.meta()
    assert meta.last_wall_at == T0 + MIN
    assert meta.last_contact_at == T0 + 2 * MIN


async def test_store_belongs_to_one_agent(tmp_path: Path) -> None:
    store = reopen(tmp_path)
    try:
        await store.claim("web-1", "boot-a")
        await store.claim("web-1", "boot-b")
        assert (await store.meta()).boot_id == "boot-b"
        with pytest.raises(StateError, match="another name"):
            await store.claim("web-2", "boot-b")
        assert (await store.meta()).agent == "web-1"
    finally:
        store.close()


def test_one_agent_process_per_state_directory(store: SqliteLeaseStore, tmp_path: Path) -> None:
    # The message names the holder (here this very process, which holds the fixture's store).
    with pytest.raises(StateError, match=rf"another agent \(pid {os.getpid()}\) is running"):
        SqliteLeaseStore.open(tmp_path)


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    assert migrate(db) == 4
    assert migrate(db) == 0
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    finally:
        conn.close()
    tables = {row[0] for row in rows}
    assert {"leases", "meta", "outbox", "breakglass", "locks"} <= tables


async def test_pending_migrations_run_in_a_child_process(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    assert pending(db)
    assert await migrate_isolated(db) == ALL_MIGRATIONS
    assert not pending(db)
    assert await migrate_isolated(db) == 0
    assert migrate(db) == 0
    # A store opened this way has its schema.
    store, why = await SqliteLeaseStore.open_or_recover(tmp_path, now_ms=1)
    assert why == ""
    store.close()


async def test_the_migration_child_ignores_code_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An `agent` package planted where the agent was started must not run in its place.
    planted = tmp_path / "cwd" / "agent"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("raise SystemExit(99)\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "cwd"))
    assert await migrate_isolated(tmp_path / "agent.db") == ALL_MIGRATIONS


async def test_a_file_that_is_not_a_database_fails_migration_as_a_database_error(
    tmp_path: Path,
) -> None:
    db = tmp_path / "agent.db"
    db.write_bytes(b"not a database at all, " * 200)
    with pytest.raises(sqlite3.DatabaseError):
        await migrate_isolated(db)


async def test_open_or_recover_moves_an_unreadable_table_aside_with_child_migrations(
    tmp_path: Path,
) -> None:
    (tmp_path / "agent.db").write_bytes(b"not a database at all, " * 200)
    store, why = await SqliteLeaseStore.open_or_recover(tmp_path, now_ms=1)
    try:
        assert "file is not a database" in why
        assert (tmp_path / "agent.db.corrupt-1").exists()
        assert await store.active_leases() == []
    finally:
        store.close()


async def test_readonly_lookup_answers_from_the_table(
    store: SqliteLeaseStore, tmp_path: Path
) -> None:
    db = tmp_path / "agent.db"
    now = T0 + MIN
    short = lease(length=5 * MIN)
    long = lease(length=9 * MIN)
    later = lease("bob", "ssh", start=5 * MIN)
    gone = lease("carol", "deploy", state=LeaseState.REMOVED)
    await store.record_command(seq=1, epoch=1, writes=[short, long, later, gone])

    found = find_allowing(db, "alice", "deploy", to_ms(now))
    assert found is not None
    assert (found.grant_id, found.not_after_ms) == (long.grant_id, to_ms(long.not_after))
    assert find_allowing(db, "alice", "ssh", to_ms(now)) is None
    assert find_allowing(db, "bob", "ssh", to_ms(now)) is None  # not started yet
    assert find_allowing(db, "carol", "deploy", to_ms(now)) is None  # removed
    assert find_allowing(db, "alice", "deploy", to_ms(T0 + 9 * MIN)) is None  # at not_after

    # A wall clock set back cannot revive a lease: the persisted floor wins.
    await store.note_wall(T0 + 10 * MIN)
    assert find_allowing(db, "alice", "deploy", to_ms(now)) is None


def test_readonly_lookup_without_a_table_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no lease table"):
        find_allowing(tmp_path / "agent.db", "alice", "deploy", 0)
    (tmp_path / "agent.db").write_bytes(b"not a database at all, just some bytes" * 100)
    with pytest.raises(StateError):
        find_allowing(tmp_path / "agent.db", "alice", "deploy", 0)
