"""The revoke path when removals fail: pending removals persisted in a real SQLite file and
retried in the background across restarts, later commands not held up, ordering with a later
grant for the same pair, report-only drift, and a revoke on a full disk kept in the journal."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.commands import AckStatus, RevokeSpec
from agent.domain.coverage import DriftMode
from agent.domain.leases import LeaseState
from agent.domain.removals import Removal
from agent.enforcers.base import EnforcerSet
from agent.enforcers.file import FileEnforcer
from agent.engine import Engine
from agent.store.journal import JOURNAL_NAME, SIZE, Journal, JournalFull, read_entries
from agent.store.readonly import DB_NAME, find_allowing
from agent.store.sqlite import SqliteLeaseStore
from jitmesh.clock import FakeClock, to_ms

from .factories import AGENT, T0, command, cover, grant
from .fakes import RecordingEnforcer

SEC = timedelta(seconds=1)
MIN = timedelta(minutes=1)
PAIR = ("alice", "deploy")
OTHER = ("bob", "ssh")


class GatedEnforcer(RecordingEnforcer):
    """A recording enforcer whose removals wait while `gate` is closed (a hanging hook)."""

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = asyncio.Event()
        self.gate.set()
        self.hanging = asyncio.Event()

    async def remove(self, subject: str, action: str) -> None:
        if not self.gate.is_set():
            self.hanging.set()
            await self.gate.wait()
        await super().remove(subject, action)


@dataclass
class Agent:
    engine: Engine
    store: SqliteLeaseStore
    clock: FakeClock
    hook: GatedEnforcer
    files: FileEnforcer
    state: Path

    async def kinds(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(e.kind, e.grant_id, dict(e.details)) for e in await self.store.pending_events(100)]


def build(
    state: Path,
    clock: FakeClock,
    hook: GatedEnforcer,
    *,
    retries: int = 4,
    drift: DriftMode = DriftMode.REMOVE,
) -> Agent:
    state.mkdir(exist_ok=True)
    store = SqliteLeaseStore.open(state)
    files = FileEnforcer(state / "markers", clock=clock)
    engine = Engine(
        name=AGENT,
        store=store,
        enforcers=EnforcerSet([files, hook], drift=[drift, DriftMode.REMOVE]),
        clock=clock,
        rand=lambda: 0.5,  # no jitter: delays of exactly 1, 2, 4 s, then every 16 s
        remove_retries=retries,
        remove_retry_base=1.0,
    )
    return Agent(engine, store, clock, hook, files, state)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[None]:
    task = asyncio.create_task(agent.engine.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(clock: FakeClock, done: Callable[[], bool], step: timedelta = SEC) -> None:
    """Advance the fake clock step by step until `done()` (or fail after 5 real seconds)."""
    async with asyncio.timeout(5):
        while not done():
            await clock.advance(step)


async def until_event(agent: Agent, kind: str) -> None:
    async with asyncio.timeout(5):
        while kind not in [k for k, _, _ in await agent.kinds()]:
            await agent.clock.advance(SEC)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    made = build(tmp_path / "state", FakeClock(T0), GatedEnforcer())
    await made.engine.start()
    yield made
    made.store.close()


async def revoke_failing(agent: Agent, seq: int = 1) -> str:
    """Grant PAIR, then revoke it with the hook failing: the ack comes back FAILED at once."""
    spec = grant(*PAIR, length=60 * MIN)
    assert (await agent.engine.handle(command(seq, spec))).status is AckStatus.APPLIED
    agent.hook.fail_remove.add(PAIR)
    ack = await agent.engine.handle(command(seq + 1, RevokeSpec(spec.grant_id)))
    assert ack.status is AckStatus.FAILED
    assert ack.reason.startswith("remove failed (retrying)")
    return spec.grant_id


async def test_failed_revoke_is_retried_in_the_background_and_reported_removed(
    agent: Agent,
) -> None:
    grant_id = await revoke_failing(agent)
    [pending] = await agent.store.removals()
    assert (pending.pair, pending.grant_ids, pending.attempts) == (PAIR, (grant_id,), 1)
    async with running(agent):
        await until(agent.clock, lambda: agent.hook.count("remove", PAIR) >= 3)
        assert PAIR in agent.hook.in_force
        agent.hook.fail_remove.clear()
        await until_event(agent, "grant.removed")
    assert PAIR not in agent.hook.in_force
    assert await agent.store.removals() == []
    assert (await agent.kinds())[-1] == (
        "grant.removed",
        grant_id,
        {"retried": "true", "attempts": "4"},
    )


async def test_attempts_run_out_revoke_failed_once_then_retries_go_on(agent: Agent) -> None:
    grant_id = await revoke_failing(agent)
    async with running(agent):
        await until_event(agent, "grant.revoke_failed")
        [pending] = await agent.store.removals()
        assert pending.attempts == 4
        # After the 4 attempts: every 16 s (base * 2^retries), and reported only once.
        await until(agent.clock, lambda: agent.hook.count("remove", PAIR) >= 7)
    kinds = await agent.kinds()
    assert [k for k, g, _ in kinds if g == grant_id] == ["grant.revoke_failed"]
    [pending] = await agent.store.removals()
    assert pending.reported
    assert pending.attempts == agent.hook.count("remove", PAIR) >= 7
    assert PAIR in agent.hook.in_force


async def test_pending_removal_survives_a_restart_and_is_never_reported_done_early(
    tmp_path: Path,
) -> None:
    clock, hook = FakeClock(T0), GatedEnforcer()
    first = build(tmp_path / "state", clock, hook)
    await first.engine.start()
    grant_id = await revoke_failing(first)
    first.store.close()

    # The lease table on disk: the lease grants nothing, the removal is still owed.
    db = tmp_path / "state" / DB_NAME
    assert find_allowing(db, *PAIR, to_ms(clock.now())) is None
    again = build(tmp_path / "state", clock, hook)
    await again.engine.start()
    try:
        [pending] = await again.store.removals()
        assert (pending.grant_ids, pending.attempts) == ((grant_id,), 1)
        # The coordinator sends the revoke again (its ack was lost): still not done.
        dup = await again.engine.handle(command(2, RevokeSpec(grant_id)))
        assert (dup.status, dup.reason) == (
            AckStatus.FAILED,
            "removal pending: gated: remove refused",
        )
        async with running(again):
            # Retried at once after the restart, then on the schedule.
            await until(again.clock, lambda: hook.count("remove", PAIR) >= 3)
            assert "grant.removed" not in [k for k, _, _ in await again.kinds()]
            hook.fail_remove.clear()
            await until_event(again, "grant.removed")
        assert PAIR not in hook.in_force
        assert await again.store.removals() == []
    finally:
        again.store.close()


async def test_a_hanging_retry_does_not_hold_up_a_later_grant(agent: Agent) -> None:
    await revoke_failing(agent)
    agent.hook.gate.clear()
    async with running(agent):
        await until(agent.clock, agent.hook.hanging.is_set)
        other = grant(*OTHER, length=10 * MIN)
        ack = await agent.engine.handle(command(3, other))
        # Applied while the removal's hook still hangs (its call is recorded once it returns).
        assert ack.status is AckStatus.APPLIED
        assert OTHER in agent.hook.in_force
        assert not agent.hook.gate.is_set()
        assert agent.hook.count("remove", PAIR) == 1
        agent.hook.gate.set()


async def test_a_later_grant_for_the_same_pair_is_never_undone_by_the_retry(agent: Agent) -> None:
    first = await revoke_failing(agent)
    agent.hook.gate.clear()
    async with running(agent):
        await until(agent.clock, agent.hook.hanging.is_set)
        later = grant(*PAIR, length=30 * MIN)
        granting = asyncio.create_task(agent.engine.handle(command(3, later)))
        for _ in range(20):
            await asyncio.sleep(0)
        # Same pair: the grant waits for the removal running in the background.
        assert not granting.done()
        agent.hook.gate.set()  # the hanging removal returns (and fails again)
        async with asyncio.timeout(5):
            ack = await granting
        assert ack.status is AckStatus.APPLIED
        assert agent.hook.calls[-1] == ("apply", PAIR)
        removes = agent.hook.count("remove", PAIR)
        # Held by the later grant: the owed removal is parked, however long it waits.
        await agent.clock.advance(5 * MIN)
        await agent.clock.advance(5 * MIN)
        assert agent.hook.count("remove", PAIR) == removes
        assert PAIR in agent.hook.in_force
        # The later grant's own end removes the pair: the first grant is reported removed too.
        agent.hook.fail_remove.clear()
        done = await agent.engine.handle(command(4, RevokeSpec(later.grant_id)))
        assert (done.status, done.reason) == (AckStatus.APPLIED, "")
    assert PAIR not in agent.hook.in_force
    assert await agent.store.removals() == []
    assert ("grant.removed", first, {"retried": "true", "attempts": "3"}) in await agent.kinds()


async def test_report_only_drift_is_audited_once_and_left_in_place(tmp_path: Path) -> None:
    clock, hook = FakeClock(T0), GatedEnforcer()
    state = tmp_path / "state"
    agent = build(state, clock, hook, drift=DriftMode.REPORT)
    # Access on the host that the lease table never granted.
    await agent.files.apply(cover(*OTHER))
    await agent.engine.start()
    try:
        assert OTHER in await agent.files.observe()
        assert [(k, dict(d)) for k, _, d in await agent.kinds()] == [
            ("drift.reported", {"enforcer": "file"})
        ]
        await agent.engine.reconcile()
        assert len(await agent.kinds()) == 1  # not reported twice
        # The enforcer set to remove (the gated one) still gets its drift removed.
        hook.in_force.add(PAIR)
        await agent.engine.reconcile()
        assert PAIR not in hook.in_force
        assert OTHER in await agent.files.observe()
    finally:
        agent.store.close()


async def test_report_only_drift_never_brings_expired_access_back(tmp_path: Path) -> None:
    clock, hook = FakeClock(T0), GatedEnforcer()
    state = tmp_path / "state"
    agent = build(state, clock, hook, drift=DriftMode.REPORT)
    await agent.engine.start()
    spec = grant(*PAIR, length=MIN)
    await agent.engine.handle(command(1, spec))
    agent.store.close()
    await clock.advance(2 * MIN)  # expires while the agent is down
    again = build(state, clock, hook, drift=DriftMode.REPORT)
    await again.engine.start()
    try:
        assert PAIR not in await again.files.observe()
        assert PAIR not in hook.in_force
        assert [k for k, _, _ in await again.kinds()] == ["grant.expired"]
    finally:
        again.store.close()


def fill(store: SqliteLeaseStore, grant_id: str | None = None) -> None:
    """A full disk: PRAGMA max_page_count at the current size, every page filled, and the
    lease `grant_id`'s own page too (its row grown until it no longer fits), so that ending it
    needs a page the database cannot get."""
    db = store._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")
    n = 0
    for size in (4096, 512, 64, 8, 1):
        with contextlib.suppress(sqlite3.Error):
            while True:
                n += 1
                db.execute(
                    "INSERT INTO leases (grant_id, subject, action, request_id, not_before_ms, "
                    "not_after_ms, offline_mode, offline_grace_ms, state, seq, removed_at_ms, "
                    "remove_reason) VALUES (?, 's', 'a', '', 0, 0, 'HOLD', 0, 'removed', 0, 0, ?)",
                    (f"fill-{n}", "x" * size),
                )
        with contextlib.suppress(sqlite3.Error):
            while True:
                n += 1
                db.execute(
                    "INSERT INTO removals (subject, action, attempts, next_at_ms, since_ms, error) "
                    "VALUES ('fill', ?, 1, 0, 0, ?)",
                    (f"fill-{n}", "x" * size),
                )
    with contextlib.suppress(sqlite3.Error):
        while grant_id is not None:
            db.execute(
                "UPDATE leases SET request_id = request_id || 'x' WHERE grant_id = ?", (grant_id,)
            )


def unfill(store: SqliteLeaseStore) -> None:
    store._db.execute("PRAGMA max_page_count=1073741823")
    store._db.execute("DELETE FROM leases WHERE grant_id LIKE 'fill-%'")
    store._db.execute("DELETE FROM removals WHERE subject = 'fill'")


async def test_full_disk_revoke_is_journaled_and_a_restart_never_reapplies(
    tmp_path: Path,
) -> None:
    clock, hook = FakeClock(T0), GatedEnforcer()
    state = tmp_path / "state"
    agent = build(state, clock, hook)
    await agent.engine.start()
    spec = grant(*PAIR, length=60 * MIN)
    await agent.engine.handle(command(1, spec))
    assert (state / JOURNAL_NAME).stat().st_size == SIZE  # allocated up front
    fill(agent.store, spec.grant_id)
    ack = await agent.engine.handle(command(2, RevokeSpec(spec.grant_id)))
    assert ack.status is AckStatus.APPLIED
    assert ack.reason == "access removed; lease table full, revoke kept in the journal"
    assert PAIR not in hook.in_force
    # The table still says active; the journal says ended, and `check` believes the journal.
    raw = agent.store._db.execute(
        "SELECT state FROM leases WHERE grant_id = ?", (spec.grant_id,)
    ).fetchone()
    assert raw == ("active",)
    assert await agent.store.active_leases() == []
    assert find_allowing(state / DB_NAME, *PAIR, to_ms(clock.now())) is None
    agent.store.close()

    again = build(state, clock, hook)
    await again.engine.start()
    try:
        # At open the journal moved into the table (which has room again) and was cleared.
        ended = await again.store.lease(spec.grant_id)
        assert ended is not None
        assert (ended.state, ended.remove_reason) == (LeaseState.REMOVED, "revoked")
        assert read_entries(state / JOURNAL_NAME) == {"ends": [], "removals": []}
        assert hook.count("apply", PAIR) == 1
        assert PAIR not in hook.in_force
        assert PAIR not in await again.files.observe()
        # The coordinator resends the revoke (the sequence number was not persisted): done.
        dup = await again.engine.handle(command(2, RevokeSpec(spec.grant_id)))
        assert (dup.status, dup.reason) == (AckStatus.APPLIED, "already ended")
    finally:
        again.store.close()


async def test_journal_is_laid_over_the_table_until_it_takes_writes_again(tmp_path: Path) -> None:
    clock, hook = FakeClock(T0), GatedEnforcer()
    agent = build(tmp_path / "state", clock, hook)
    await agent.engine.start()
    try:
        held = grant(*OTHER, length=60 * MIN)
        spec = grant(*PAIR, length=60 * MIN)
        await agent.engine.handle(command(1, held))
        await agent.engine.handle(command(2, spec))
        fill(agent.store, spec.grant_id)
        hook.fail_remove.add(PAIR)
        ack = await agent.engine.handle(command(3, RevokeSpec(spec.grant_id)))
        assert ack.status is AckStatus.FAILED
        # Both the end and the owed removal are in the journal, read back through the store.
        assert [lease.grant_id for lease in await agent.store.active_leases()] == [held.grant_id]
        [pending] = [r for r in await agent.store.removals() if r.pair == PAIR]
        assert pending.grant_ids == (spec.grant_id,)
        assert len(read_entries(tmp_path / "state" / JOURNAL_NAME)["removals"]) == 1
        unfill(agent.store)
        await agent.store.note_wall(clock.now())  # the next write moves the journal in
        assert read_entries(tmp_path / "state" / JOURNAL_NAME) == {"ends": [], "removals": []}
        raw = agent.store._db.execute(
            "SELECT state FROM leases WHERE grant_id = ?", (spec.grant_id,)
        ).fetchone()
        assert raw == ("removed",)
        assert [r.pair for r in await agent.store.removals()] == [PAIR]
    finally:
        agent.store.close()


def test_journal_keeps_the_previous_version_when_a_write_is_torn(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    journal = Journal.open(path)
    try:
        assert path.stat().st_size == SIZE
        first = {"ends": [{"grant_id": "grt-1"}], "removals": []}
        second = {"ends": [{"grant_id": "grt-1"}, {"grant_id": "grt-2"}], "removals": []}
        journal.write(first)
        journal.write(second)
        assert read_entries(path) == second
        with pytest.raises(JournalFull):
            journal.write({"ends": [{"grant_id": "x" * SIZE}], "removals": []})
        assert read_entries(path) == second
    finally:
        journal.close()
    # A crash in the middle of the second write: its slot is damaged, the first version holds.
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # the second version (sequence number 2) is in slot 0
    path.write_bytes(bytes(data))
    assert read_entries(path) == first
    assert path.stat().st_size == SIZE


async def test_a_journaled_removal_never_overwrites_a_newer_row(tmp_path: Path) -> None:
    store = SqliteLeaseStore.open(tmp_path)
    try:
        owed = Removal(PAIR, ("grt-1",), attempts=2, next_at=T0, since=T0, error="old")
        fill(store)
        await store.save_removal(owed)
        assert read_entries(tmp_path / JOURNAL_NAME)["removals"] != []
        unfill(store)
        # The table takes the newer state; the journal's older one, moved in after, loses.
        await store.save_removal(replace(owed, attempts=5, error="new"))
        assert read_entries(tmp_path / JOURNAL_NAME) == {"ends": [], "removals": []}
        [kept] = await store.removals()
        assert (kept.attempts, kept.error) == (5, "new")
    finally:
        store.close()


async def test_a_journaled_removal_that_succeeds_is_not_brought_back(tmp_path: Path) -> None:
    """The removal went to the journal (disk full); space came back and the retry worked: its
    drop is the first write the table takes, and the journal's copy must not return with it,
    now or after a restart."""
    store = SqliteLeaseStore.open(tmp_path)
    try:
        fill(store)
        await store.save_removal(Removal(PAIR, ("grt-1",), attempts=1, next_at=T0, since=T0))
        assert read_entries(tmp_path / JOURNAL_NAME)["removals"] != []
        assert PAIR in [r.pair for r in await store.removals()]
        unfill(store)
        await store.drop_removal(PAIR)
        assert await store.removals() == []
        assert read_entries(tmp_path / JOURNAL_NAME) == {"ends": [], "removals": []}
    finally:
        store.close()
    again = SqliteLeaseStore.open(tmp_path)
    try:
        assert await again.removals() == []
    finally:
        again.close()
