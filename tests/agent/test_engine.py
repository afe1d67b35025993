"""The engine with a fake clock, a real SQLite store and recording or file enforcers."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.commands import AckStatus, RevokeSpec, SnapshotSpec
from agent.domain.coverage import Cover
from agent.domain.leases import LeaseState
from agent.enforcers.base import EnforcerSet
from agent.enforcers.file import FileEnforcer
from agent.engine import Engine
from agent.store.sqlite import SqliteLeaseStore
from jitmesh.clock import FakeClock

from .factories import AGENT, T0, command, cover, gid, grant, revoke_after
from .fakes import RecordingEnforcer

MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)
PAIR = ("alice", "deploy")


@dataclass
class Rig:
    engine: Engine
    store: SqliteLeaseStore
    clock: FakeClock
    recorder: RecordingEnforcer
    files: FileEnforcer
    state: Path

    async def kinds(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(e.kind, e.grant_id, dict(e.details)) for e in await self.store.pending_events(100)]


def build(state: Path, clock: FakeClock, recorder: RecordingEnforcer) -> Rig:
    state.mkdir(exist_ok=True)
    store = SqliteLeaseStore.open(state)
    files = FileEnforcer(state / "markers", clock=clock)
    engine = Engine(
        name=AGENT,
        store=store,
        enforcers=EnforcerSet([files, recorder]),
        clock=clock,
        rand=lambda: 0.5,
    )
    return Rig(engine, store, clock, recorder, files, state)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = build(tmp_path / "state", FakeClock(T0), RecordingEnforcer())
    await made.engine.start()
    yield made
    made.store.close()


async def restart(rig: Rig) -> Rig:
    rig.store.close()
    again = build(rig.state, rig.clock, rig.recorder)
    await again.engine.start()
    return again


async def test_grant_applies_then_acks(rig: Rig) -> None:
    spec = grant()
    ack = await rig.engine.handle(command(1, spec))
    assert (ack.seq, ack.status, ack.grant_id) == (1, AckStatus.APPLIED, spec.grant_id)
    assert await rig.files.observe() == {PAIR}
    stored = await rig.store.lease(spec.grant_id)
    assert stored is not None
    assert stored.applied_at == T0
    assert (await rig.store.meta()).last_applied_seq == 1


async def test_grant_is_persisted_in_one_commit_before_its_hook(rig: Rig) -> None:
    # The push path commits once per grant: the row (already marked applied), the sequence
    # number and the epoch together, before the enforcer runs; nothing is committed after it.
    statements: list[str] = []
    rig.store._db.set_trace_callback(statements.append)
    ack = await rig.engine.handle(command(1, grant()))
    rig.store._db.set_trace_callback(None)
    assert ack.status is AckStatus.APPLIED
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    assert rig.recorder.in_force == {PAIR}


class _Killed(BaseException):
    """The process dying between two steps (nothing after it runs)."""


class _DiesOnApply(RecordingEnforcer):
    async def apply(self, cover: Cover) -> None:
        raise _Killed


async def test_death_between_the_commit_and_the_hook_is_repaired_before_connecting(
    tmp_path: Path,
) -> None:
    clock = FakeClock(T0)
    state = tmp_path / "state"
    state.mkdir()
    store = SqliteLeaseStore.open(state)
    engine = Engine(name=AGENT, store=store, enforcers=EnforcerSet([_DiesOnApply()]), clock=clock)
    await engine.start()
    spec = grant()
    with pytest.raises(_Killed):
        await engine.handle(command(1, spec))
    store.close()

    again = build(state, clock, RecordingEnforcer())
    try:
        stored = await again.store.lease(spec.grant_id)
        assert stored is not None
        assert stored.applied_at == T0
        assert (await again.store.meta()).last_applied_seq == 1
        await again.engine.start()
        # Applied once by the start-up reconcile; the resent command is a duplicate.
        assert again.recorder.calls == [("apply", PAIR)]
        assert await again.files.observe() == {PAIR}
        ack = await again.engine.handle(command(1, spec))
        assert (ack.status, ack.reason) == (AckStatus.DUPLICATE, "")
        assert again.recorder.calls == [("apply", PAIR)]
    finally:
        again.store.close()


async def test_duplicate_command_is_reacked_without_a_second_apply(rig: Rig) -> None:
    spec = grant()
    await rig.engine.handle(command(1, spec))
    ack = await rig.engine.handle(command(1, spec))
    assert (ack.status, ack.reason) == (AckStatus.DUPLICATE, "")
    assert rig.recorder.count("apply", PAIR) == 1


async def test_same_grant_under_a_new_sequence_number_is_not_applied_again(rig: Rig) -> None:
    spec = grant()
    await rig.engine.handle(command(1, spec))
    ack = await rig.engine.handle(command(2, spec))
    assert (ack.status, ack.reason) == (AckStatus.APPLIED, "already applied")
    assert rig.recorder.count("apply", PAIR) == 1
    assert (await rig.store.meta()).last_applied_seq == 2


async def test_command_for_another_agent_changes_nothing(rig: Rig) -> None:
    ack = await rig.engine.handle(command(5, grant(), agent="web-2"))
    assert ack.status is AckStatus.REJECTED
    assert rig.recorder.calls == []
    assert (await rig.store.meta()).last_applied_seq == 0


async def test_expired_on_arrival_is_rejected_but_consumes_its_number(rig: Rig) -> None:
    await rig.clock.advance(11 * MIN)
    ack = await rig.engine.handle(command(1, grant(length=10 * MIN)))
    assert (ack.status, ack.reason) == (AckStatus.REJECTED, "expired on arrival")
    assert rig.recorder.calls == []
    assert (await rig.store.meta()).last_applied_seq == 1


async def test_revoke_before_grant_leaves_a_tombstone_that_refuses_the_grant(rig: Rig) -> None:
    spec = grant()
    ack = await rig.engine.handle(command(1, RevokeSpec(spec.grant_id)))
    assert ack.status is AckStatus.APPLIED
    late = await rig.engine.handle(command(2, spec))
    assert (late.status, late.reason) == (AckStatus.REJECTED, "tombstoned")
    assert rig.recorder.calls == []
    stored = await rig.store.lease(spec.grant_id)
    assert stored is not None
    assert stored.state is LeaseState.TOMBSTONE


async def test_overlapping_grants_keep_access_until_the_last_one_ends(rig: Rig) -> None:
    first, second = grant(), grant()
    await rig.engine.handle(command(1, first))
    await rig.engine.handle(command(2, second))
    assert rig.recorder.count("apply", PAIR) == 1

    ack = await rig.engine.handle(command(3, RevokeSpec(first.grant_id)))
    assert ack.status is AckStatus.APPLIED
    assert rig.recorder.count("remove", PAIR) == 0
    assert await rig.files.observe() == {PAIR}

    await rig.engine.handle(command(4, RevokeSpec(second.grant_id)))
    assert rig.recorder.count("remove", PAIR) == 1
    assert await rig.files.observe() == set()


async def test_revoke_is_idempotent(rig: Rig) -> None:
    spec = grant()
    await rig.engine.handle(command(1, spec))
    await rig.engine.handle(command(2, RevokeSpec(spec.grant_id)))
    again = await rig.engine.handle(command(3, RevokeSpec(spec.grant_id)))
    assert (again.status, again.reason) == (AckStatus.APPLIED, "already ended")
    assert rig.recorder.count("remove", PAIR) == 1


async def test_expiry_removes_access_and_reports_it(rig: Rig) -> None:
    spec = grant(length=10 * MIN)
    await rig.engine.handle(command(1, spec))
    await rig.clock.advance(10 * MIN - SEC)
    await rig.engine.sweep()
    assert await rig.files.observe() == {PAIR}
    await rig.clock.advance(SEC)
    await rig.engine.sweep()
    assert await rig.files.observe() == set()
    assert await rig.kinds() == [("grant.expired", spec.grant_id, {})]
    stored = await rig.store.lease(spec.grant_id)
    assert stored is not None
    assert (stored.state, stored.remove_reason) == (LeaseState.REMOVED, "expired")


async def test_expiry_of_one_overlapping_lease_keeps_the_pair(rig: Rig) -> None:
    short, long = grant(length=5 * MIN), grant(length=20 * MIN)
    await rig.engine.handle(command(1, short))
    await rig.engine.handle(command(2, long))
    await rig.clock.advance(6 * MIN)
    await rig.engine.sweep()
    assert await rig.files.observe() == {PAIR}
    assert rig.recorder.count("remove", PAIR) == 0
    assert [k for k, _, _ in await rig.kinds()] == ["grant.expired"]


async def test_wall_clock_set_back_never_extends_a_grant(rig: Rig) -> None:
    spec = grant(length=10 * MIN)
    await rig.engine.handle(command(1, spec))
    await rig.clock.jump_wall(-timedelta(hours=1))
    await rig.clock.advance(10 * MIN)
    await rig.engine.sweep()
    assert await rig.files.observe() == set()


async def test_wall_clock_jump_forward_ends_grants_early(rig: Rig) -> None:
    await rig.engine.handle(command(1, grant(length=10 * MIN)))
    await rig.clock.jump_wall(timedelta(hours=1))
    await rig.engine.sweep()
    assert await rig.files.observe() == set()


async def test_scheduled_grant_starts_at_not_before(rig: Rig) -> None:
    spec = grant(start=2 * MIN, length=5 * MIN)
    ack = await rig.engine.handle(command(1, spec))
    assert (ack.status, ack.reason) == (AckStatus.APPLIED, "scheduled")
    assert rig.recorder.calls == []
    delay = await rig.engine.sweep()
    assert delay == 1.0  # naps at most a second, the start is two minutes away
    await rig.clock.advance(2 * MIN)
    await rig.engine.sweep()
    assert await rig.files.observe() == {PAIR}
    assert await rig.kinds() == [("grant.applied", spec.grant_id, {})]


async def test_failed_apply_is_acked_failed_and_rolled_back(rig: Rig) -> None:
    rig.recorder.fail_apply.add(PAIR)
    spec = grant()
    ack = await rig.engine.handle(command(1, spec))
    assert ack.status is AckStatus.FAILED
    assert "apply refused" in ack.reason
    assert await rig.files.observe() == set()  # the file enforcer was rolled back
    stored = await rig.store.lease(spec.grant_id)
    assert stored is not None
    assert stored.state is LeaseState.FAILED
    assert (await rig.store.meta()).last_applied_seq == 1


class _TableFillsDuringApply(RecordingEnforcer):
    """Refuses the apply, and by then the lease table takes no write (the disk filled while the
    hook ran): the row written as applied before the hook cannot be marked failed."""

    store: SqliteLeaseStore | None = None

    async def apply(self, cover: Cover) -> None:
        assert self.store is not None
        self.store._db.execute("PRAGMA query_only=1")
        await super().apply(cover)


async def test_failed_apply_that_cannot_be_recorded_never_comes_back(tmp_path: Path) -> None:
    # The row was committed as applied before the hook; the hook failed and the table refuses
    # the failure: the end goes to the journal, so neither a reconcile nor a restart applies it.
    state = tmp_path / "state"
    hook = _TableFillsDuringApply()
    hook.fail_apply.add(PAIR)
    first = build(state, FakeClock(T0), hook)
    hook.store = first.store
    await first.engine.start()
    spec = grant(length=10 * MIN)
    ack = await first.engine.handle(command(1, spec))
    assert ack.status is AckStatus.FAILED
    assert "apply refused" in ack.reason
    assert await first.store.active_leases() == []
    await first.engine.reconcile()
    assert hook.count("apply", PAIR) == 1
    assert await first.files.observe() == set()
    first.store.close()

    hook.fail_apply.clear()
    again = build(state, first.clock, hook)
    hook.store = None
    try:
        await again.engine.start()
        stored = await again.store.lease(spec.grant_id)
        assert stored is not None
        assert stored.state is LeaseState.FAILED
        assert hook.count("apply", PAIR) == 1
        assert PAIR not in hook.in_force
        assert await again.files.observe() == set()
    finally:
        again.store.close()


async def test_failed_removal_at_expiry_is_retried_until_it_works(rig: Rig) -> None:
    spec = grant(length=MIN)
    await rig.engine.handle(command(1, spec))
    rig.recorder.fail_remove.add(PAIR)
    await rig.clock.advance(MIN)
    delay = await rig.engine.sweep()
    # The lease stays active (access may still be in force) and nothing is reported yet.
    assert 0 < delay <= 1.0
    stored = await rig.store.lease(spec.grant_id)
    assert stored is not None
    assert stored.state is LeaseState.ACTIVE
    assert await rig.kinds() == []

    rig.recorder.fail_remove.clear()
    await rig.clock.advance(timedelta(seconds=delay))
    await rig.engine.sweep()
    assert rig.recorder.in_force == set()
    assert [k for k, _, _ in await rig.kinds()] == ["grant.expired"]


async def test_snapshot_replaces_the_set(rig: Rig) -> None:
    keep, drop = grant("alice", "deploy"), grant("bob", "ssh")
    await rig.engine.handle(command(5, keep))
    await rig.engine.handle(command(6, drop))
    new = grant("carol", "deploy")
    buried = gid()
    ack = await rig.engine.handle(
        command(3, SnapshotSpec(grants=(keep, new), tombstones=(buried,)))
    )
    assert ack.status is AckStatus.APPLIED
    assert ack.reason == "held 2, ended 1, refused 0"
    assert await rig.files.observe() == {("alice", "deploy"), ("carol", "deploy")}
    assert (await rig.store.meta()).last_applied_seq == 3
    stored = await rig.store.lease(buried)
    assert stored is not None
    assert stored.state is LeaseState.TOMBSTONE
    # After the snapshot, numbering continues from it: 4 is new, not a duplicate.
    ack = await rig.engine.handle(command(4, RevokeSpec(new.grant_id)))
    assert (ack.status, ack.reason) == (AckStatus.APPLIED, "")


async def test_offline_grace_ends_revoke_after_grants_only(rig: Rig) -> None:
    strict = grant("alice", "deploy", offline=revoke_after(5 * MIN), length=60 * MIN)
    lenient = grant("bob", "ssh", length=60 * MIN)
    await rig.engine.coordinator_reached()
    await rig.engine.handle(command(1, strict))
    await rig.engine.handle(command(2, lenient))
    await rig.clock.advance(10 * MIN)
    await rig.engine.sweep()
    assert await rig.files.observe() == {("alice", "deploy"), ("bob", "ssh")}  # still connected

    await rig.engine.coordinator_lost()
    await rig.clock.advance(5 * MIN - SEC)
    await rig.engine.sweep()
    assert ("alice", "deploy") in await rig.files.observe()
    await rig.clock.advance(SEC)
    await rig.engine.sweep()
    assert await rig.files.observe() == {("bob", "ssh")}
    assert await rig.kinds() == [("grant.removed", strict.grant_id, {"reason": "offline"})]


async def test_restart_expires_what_ended_while_down_then_reconciles(rig: Rig) -> None:
    short, long = grant("alice", "deploy", length=MIN), grant("bob", "ssh", length=60 * MIN)
    await rig.engine.handle(command(1, short))
    await rig.engine.handle(command(2, long))
    rig.store.close()
    # While down: time passes, someone deletes bob's marker, and someone adds access by hand.
    await rig.clock.advance(10 * MIN)
    (rig.state / "markers" / "bob:ssh").unlink()
    await rig.files.apply(cover("mallory", "root"))

    again = build(rig.state, rig.clock, RecordingEnforcer())
    try:
        await again.engine.start()
        assert await again.files.observe() == {("bob", "ssh")}
        events = await again.kinds()
        assert ("grant.expired", short.grant_id, {"while": "down"}) in events
        assert ("drift.removed", "", {"enforcer": "file"}) in events
        assert len(events) == 2
        # The recorder (a fresh, empty host view) was given the held pair back.
        assert again.recorder.in_force == {("bob", "ssh")}
        assert (await again.store.meta()).last_applied_seq == 2
    finally:
        again.store.close()


async def test_restart_with_the_clock_set_back_removes_everything_until_coordinator_time(
    rig: Rig,
) -> None:
    spec = grant(length=10 * MIN)
    await rig.engine.handle(command(1, spec))
    await rig.clock.advance(9 * MIN)
    await rig.engine.checkpoint()
    # The host comes back with its clock an hour slow: no deadline can be trusted, so every
    # managed grant goes at once, and new grants are refused until the coordinator's time is seen.
    await rig.clock.jump_wall(-timedelta(hours=1))
    again = await restart(rig)
    try:
        assert await again.files.observe() == set()
        kinds = [k for k, _, _ in await again.kinds()]
        assert "clock.untrusted" in kinds
        assert "grant.removed" in kinds
        late = grant(length=10 * MIN)
        ack = await again.engine.handle(command(2, late))
        assert (ack.status, ack.reason) == (AckStatus.REJECTED, "agent clock untrusted")
        assert await again.files.observe() == set()
        # The coordinator's time: trusted again, and "now" never runs behind it.
        await again.engine.coordinator_time_seen(T0 + 9 * MIN)
        assert again.engine.now() >= T0 + 9 * MIN
        fresh = grant(length=10 * MIN)
        ack = await again.engine.handle(command(3, fresh))
        assert ack.status is AckStatus.APPLIED
        assert await again.files.observe() == {PAIR}
    finally:
        again.store.close()


async def test_grant_issued_beyond_the_skew_tolerance_is_refused_and_audited(
    tmp_path: Path,
) -> None:
    clock = FakeClock(T0)
    store = SqliteLeaseStore.open(tmp_path)
    await store.claim(AGENT, "boot")
    files = FileEnforcer(tmp_path / "access", clock=clock)
    engine = Engine(
        name=AGENT,
        store=store,
        enforcers=EnforcerSet([files]),
        clock=clock,
        skew_tolerance=timedelta(seconds=2),
    )
    await engine.start()
    try:
        spec = grant(length=10 * MIN)
        # Issued 5 s "in the future": the agent's clock is behind.
        skewed = replace(command(1, spec), issued_at=T0 + 5 * SEC)
        ack = await engine.handle(skewed)
        assert (ack.status, ack.reason) == (AckStatus.REJECTED, "clock skew beyond tolerance")
        assert await files.observe() == set()
        # Issued long ago is a slow delivery, not skew.
        fine = replace(command(2, grant(length=10 * MIN)), issued_at=T0 - 5 * MIN)
        assert (await engine.handle(fine)).status is AckStatus.APPLIED
        # A Welcome with the coordinator's clock 10 s behind the agent's: refused until one
        # agrees again (a clock behind would simply be corrected).
        await engine.coordinator_time_seen(T0 - 10 * SEC)
        ack = await engine.handle(command(3, grant(length=10 * MIN)))
        assert (ack.status, ack.reason) == (AckStatus.REJECTED, "clock skew beyond tolerance")
        await clock.advance(10 * SEC)
        await engine.coordinator_time_seen(clock.now())
        assert (await engine.handle(command(4, grant(length=10 * MIN)))).status is AckStatus.APPLIED
        kinds = [e.kind for e in await store.pending_events(10)]
        assert kinds == ["grant.refused", "clock.skewed", "grant.refused", "clock.trusted"]
    finally:
        store.close()


async def test_expiry_loop_wakes_on_time_and_signals_the_outbox(rig: Rig) -> None:
    spec = grant(length=3 * SEC)
    await rig.engine.handle(command(1, spec))
    rig.engine.outbox_changed.clear()
    async with asyncio.TaskGroup() as tasks:
        loop = tasks.create_task(rig.engine.run())
        for _ in range(3):
            await rig.clock.advance(SEC)
        async with asyncio.timeout(5):
            await rig.engine.outbox_changed.wait()
        loop.cancel()
    assert await rig.files.observe() == set()
    assert [k for k, _, _ in await rig.kinds()] == ["grant.expired"]


async def test_a_grant_beyond_the_planned_sweep_does_not_wake_the_expiry_loop(rig: Rig) -> None:
    # Sweeps counted by their reads of all active leases (two per sweep; a grant handled reads
    # its own pair's leases only, `active_leases_of`).
    reads: list[str] = []
    rig.store._db.set_trace_callback(
        lambda sql: reads.append(sql) if "state = 'active' ORDER BY" in sql else None
    )
    async with asyncio.TaskGroup() as tasks:
        loop = tasks.create_task(rig.engine.run())
        async with asyncio.timeout(5):
            while len(reads) < 2:
                await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        before = len(reads)
        # Ends in ten minutes: nothing for the loop to do before its planned wake.
        await rig.engine.handle(command(1, grant(length=10 * MIN)))
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(reads) == before
        # Starts before the planned wake: the loop must look now, to start it on time.
        await rig.engine.handle(command(2, grant("bob", "ssh", start=SEC / 2, length=10 * MIN)))
        async with asyncio.timeout(5):
            while len(reads) < before + 2:
                await asyncio.sleep(0)
        await rig.clock.advance(SEC)
        async with asyncio.timeout(5):
            while ("bob", "ssh") not in rig.recorder.in_force:
                await asyncio.sleep(0)
        loop.cancel()
    rig.store._db.set_trace_callback(None)


async def test_full_disk_grant_fails_without_a_hook_and_revoke_still_removes(rig: Rig) -> None:
    held = grant(length=10 * MIN, action="restart")
    await rig.engine.handle(command(1, held))
    calls = len(rig.recorder.calls)
    # Fill the disk: no page can be added to the table any more.
    pages = rig.store._db.execute("PRAGMA page_count").fetchone()[0]
    rig.store._db.execute(f"PRAGMA max_page_count={pages}")
    n = 0
    for size in (4096, 512, 64, 8, 1):
        with contextlib.suppress(sqlite3.Error):
            while True:
                n += 1
                rig.store._db.execute(
                    "INSERT INTO leases (grant_id, subject, action, request_id, not_before_ms, "
                    "not_after_ms, offline_mode, offline_grace_ms, state, seq, removed_at_ms, "
                    "remove_reason) VALUES (?, 's', 'a', '', 0, 0, 'HOLD', 0, 'removed', 0, 0, ?)",
                    (f"fill-{n}", "x" * size),
                )
    ack = await rig.engine.handle(command(2, grant(length=10 * MIN)))
    assert (ack.status, ack.reason) == (AckStatus.FAILED, "cannot persist the grant")
    assert len(rig.recorder.calls) == calls  # no hook ran
    # An update in place may still fit; whether it is persisted or not, the access goes.
    await rig.engine.handle(command(3, RevokeSpec(held.grant_id)))
    assert ("alice", "restart") not in rig.recorder.in_force  # the hook still ran


async def test_a_disk_that_refuses_every_write_fails_commands_but_crashes_nothing(
    rig: Rig,
) -> None:
    """Nothing can be written (a full or failing disk; here the connection is made read-only):
    commands get a failed ack, the bookkeeping the link calls for is skipped, and the expiry
    loop keeps running and still removes access on time (it removes before it records)."""
    spec = grant(length=3 * SEC)
    await rig.engine.handle(command(1, spec))
    rig.store._db.execute("PRAGMA query_only=1")
    await rig.engine.coordinator_reached()
    await rig.engine.coordinator_alive()
    await rig.engine.note_epoch(9)
    await rig.engine.events_delivered(["evt-1"])
    ack = await rig.engine.handle(command(2, RevokeSpec(gid())))  # a tombstone to write
    assert (ack.status, ack.reason) == (AckStatus.FAILED, "cannot persist the command")
    ack = await rig.engine.handle(command(3, grant(action="restart")))
    assert (ack.status, ack.reason) == (AckStatus.FAILED, "cannot persist the grant")
    assert ("alice", "restart") not in rig.recorder.in_force
    async with asyncio.TaskGroup() as tasks:
        loop = tasks.create_task(rig.engine.run())
        async with asyncio.timeout(5):
            while PAIR in rig.recorder.in_force:
                await rig.clock.advance(SEC)
        # Past the failed record the loop goes on (it would have ended the TaskGroup).
        for _ in range(3):
            await rig.clock.advance(SEC)
        assert not loop.done()
        loop.cancel()
    await rig.engine.coordinator_lost()
    await rig.engine.checkpoint()
    assert await rig.files.observe() == set()
