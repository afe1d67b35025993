"""Commands: screened, recorded (the resume point moves with the table), enforced, acked; a
command waits for a background removal of its own pair only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from agent.domain.breakglass import KeptLock
from agent.domain.commands import (
    AckStatus,
    CommandSpec,
    LockSpec,
    RevokeSpec,
    SnapshotSpec,
    UnlockSpec,
)
from agent.domain.leases import EventKind
from tests.agent.factories import T0, command, grant
from tests.agent.fakes import RecordingEnforcer

from .conftest import Bench

PAIR = ("alice", "deploy")


async def test_a_grant_is_recorded_applied_and_acked(bench: Bench) -> None:
    spec = grant()
    ack = await bench.parts.commands.handle(command(1, spec))
    assert (ack.status, ack.grant_id, ack.reason) == (AckStatus.APPLIED, spec.grant_id, "")
    assert bench.hook.in_force == {PAIR}
    assert bench.parts.link.last_applied_seq == 1
    stored = await bench.store.lease(spec.grant_id)
    assert stored is not None
    assert stored.applied_at == T0
    again = await bench.parts.commands.handle(command(1, spec))
    assert again.status is AckStatus.DUPLICATE
    assert bench.hook.count("apply", PAIR) == 1


async def test_a_grant_for_later_is_scheduled_for_the_expiry_loop(bench: Bench) -> None:
    ack = await bench.parts.commands.handle(command(1, grant(start=timedelta(minutes=5))))
    assert (ack.status, ack.reason) == (AckStatus.APPLIED, "scheduled")
    assert bench.hook.in_force == set()
    assert bench.parts.shared.leases_changed.is_set()


async def test_a_failed_apply_ends_the_row(bench: Bench) -> None:
    bench.hook.fail_apply.add(PAIR)
    spec = grant()
    ack = await bench.parts.commands.handle(command(1, spec))
    assert ack.status is AckStatus.FAILED
    stored = await bench.store.lease(spec.grant_id)
    assert stored is not None
    assert not stored.holds


async def test_a_revoke_whose_removal_fails_is_acked_failed_and_pended(bench: Bench) -> None:
    commands = bench.parts.commands
    spec = grant()
    await commands.handle(command(1, spec))
    bench.hook.fail_remove.add(PAIR)
    ack = await commands.handle(command(2, RevokeSpec(spec.grant_id)))
    assert ack.status is AckStatus.FAILED
    assert ack.reason.startswith("remove failed (retrying)")
    assert set(bench.parts.removals.pending) == {PAIR}
    # Sent again (its ack lost): still not done while the removal is owed.
    resent = await commands.handle(command(2, RevokeSpec(spec.grant_id)))
    assert resent.status is AckStatus.FAILED


async def test_a_grant_is_refused_while_the_clock_is_untrusted(build: Callable[..., Bench]) -> None:
    bench = build()
    await bench.store.note_wall(T0 + timedelta(hours=1))
    bench.parts.time.start(await bench.store.meta())
    ack = await bench.parts.commands.handle(command(1, grant()))
    assert (ack.status, ack.reason) == (AckStatus.REJECTED, "agent clock untrusted")
    assert bench.parts.link.last_applied_seq == 1
    assert [k for k, _, _ in await bench.kinds()] == [EventKind.GRANT_REFUSED]


async def test_a_snapshot_ends_what_it_does_not_name(bench: Bench) -> None:
    commands = bench.parts.commands
    await commands.handle(command(1, grant()))
    ack = await commands.handle(command(2, SnapshotSpec(grants=(), tombstones=())))
    assert (ack.status, ack.reason) == (AckStatus.APPLIED, "held 0, ended 1, refused 0")
    assert bench.hook.in_force == set()


class _Gated(RecordingEnforcer):
    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = asyncio.Event()
        self.hanging = asyncio.Event()

    async def remove(self, subject: str, action: str) -> None:
        if (subject, action) == PAIR and not self.gate.is_set():
            self.hanging.set()
            await self.gate.wait()
        await super().remove(subject, action)


async def test_a_command_waits_for_its_own_pairs_background_removal_only(
    build: Callable[..., Bench],
) -> None:
    hook = _Gated()
    bench = build(hook=hook)
    bench.parts.time.start(await bench.store.meta())
    commands, removals = bench.parts.commands, bench.parts.removals
    await removals.pend(PAIR, ["grt-old"], "hook failed")
    async with asyncio.TaskGroup() as tasks:
        loop = tasks.create_task(removals.run(tasks))
        await bench.clock.advance(timedelta(minutes=2))  # the retry is due
        await asyncio.wait_for(hook.hanging.wait(), 5)
        # Another pair goes through while alice's removal hangs.
        other = await asyncio.wait_for(commands.handle(command(1, grant("bob", "read"))), 5)
        assert other.status is AckStatus.APPLIED
        mine = tasks.create_task(commands.handle(command(2, grant())))
        # Not done while alice's removal hangs (given time to finish if it did not wait).
        await asyncio.wait([mine], timeout=0.2)
        assert not mine.done()
        assert hook.count("apply", PAIR) == 0
        hook.gate.set()
        ack = await asyncio.wait_for(mine, 5)
        assert ack.status is AckStatus.APPLIED
        assert hook.in_force == {PAIR, ("bob", "read")}
        loop.cancel()


async def test_the_same_grant_with_a_later_deadline_moves_the_hosts_deadline(bench: Bench) -> None:
    commands = bench.parts.commands
    spec = grant()
    await commands.handle(command(1, spec))
    later = replace(spec, not_after=spec.not_after + timedelta(minutes=15))
    ack = await commands.handle(command(2, later))
    assert (ack.status, ack.reason) == (AckStatus.APPLIED, "updated")
    assert bench.hook.windows[PAIR].not_after == later.not_after
    assert bench.hook.count("apply", PAIR) == 1


def _mixed_batch() -> list[CommandSpec]:
    """Grants that start now (two for one pair, one that fails to apply), a duplicate, a
    grant for later, a revoke in the middle, a command for another agent."""
    first, second, third = grant(), grant(), grant("bob", "logs")
    failing, later, after = grant("carol", "shell"), grant(start=timedelta(minutes=5)), grant()
    return [
        command(1, first),
        command(2, second),
        command(1, first),  # sent twice: a duplicate
        command(3, third),
        command(4, failing),
        command(5, RevokeSpec(second.grant_id)),
        command(6, later),
        command(7, after),
        command(8, grant("dave", "logs"), agent="another"),
        command(8, grant("erin", "logs")),
    ]


async def test_a_batch_gets_the_acks_and_the_table_of_one_by_one(
    build: Callable[..., Bench],
) -> None:
    batch = _mixed_batch()
    benches = [build(), build()]
    for bench in benches:
        bench.parts.time.start(await bench.store.meta())
        bench.hook.fail_apply.add(("carol", "shell"))
    alone = [await benches[0].parts.commands.handle(c) for c in batch]
    together = await benches[1].parts.commands.handle_many(batch)
    assert together == alone
    tables = [
        sorted(
            (lease.grant_id, lease.state, lease.holds) for lease in await b.store.active_leases()
        )
        for b in benches
    ]
    assert tables[0] == tables[1]
    assert benches[0].hook.in_force == benches[1].hook.in_force
    assert [b.parts.link.last_applied_seq for b in benches] == [8, 8]
    # Persisted: a new table reads the same resume point.
    assert [(await b.store.meta()).last_applied_seq for b in benches] == [8, 8]


async def test_grants_that_start_now_are_committed_together(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits: list[int] = []
    record = bench.store.record_command

    async def counting(**kw: Any) -> None:
        commits.append(kw["seq"])
        await record(**kw)

    monkeypatch.setattr(bench.store, "record_command", counting)
    specs = [grant("alice", "deploy"), grant("alice", "deploy"), grant("bob", "logs")]
    acks = await bench.parts.commands.handle_many([command(k + 1, s) for k, s in enumerate(specs)])
    assert [a.status for a in acks] == [AckStatus.APPLIED] * 3
    assert commits == [3]
    # One pair applied once, ref-counted for two leases.
    assert bench.hook.count("apply", PAIR) == 1
    assert bench.hook.in_force == {PAIR, ("bob", "logs")}
    for spec in specs:
        stored = await bench.store.lease(spec.grant_id)
        assert stored is not None
        assert stored.applied_at == T0


async def test_a_snapshot_answers_for_every_grant_and_tombstone_it_names(bench: Bench) -> None:
    """Wire 0.2: the snapshot's ack carries one result per grant and tombstone, so the
    coordinator books each grant as the host holds it (issue 9, item A)."""
    commands = bench.parts.commands
    held = grant()
    await commands.handle(command(1, held))  # applied at T0
    gone = grant("bob", "restart")
    await commands.handle(command(2, gone))
    await bench.clock.advance(timedelta(minutes=1))
    new = grant("carol", "deploy", length=timedelta(minutes=30))
    late = grant("dave", "deploy", length=timedelta(seconds=30))  # over by now
    ack = await commands.handle(
        command(5, SnapshotSpec(grants=(held, new, late), tombstones=(gone.grant_id,)))
    )
    assert ack.status is AckStatus.APPLIED
    results = {r.grant_id: r for r in ack.results}
    assert set(results) == {held.grant_id, new.grant_id, late.grant_id, gone.grant_id}
    assert (results[held.grant_id].status, results[held.grant_id].applied_at) == (
        AckStatus.APPLIED,
        T0,
    )
    assert (results[new.grant_id].status, results[new.grant_id].applied_at) == (
        AckStatus.APPLIED,
        T0 + timedelta(minutes=1),
    )
    assert results[late.grant_id].status is AckStatus.REJECTED
    assert results[late.grant_id].reason
    assert results[gone.grant_id].status is AckStatus.APPLIED
    assert bench.hook.in_force == {("alice", "deploy"), ("carol", "deploy")}
    # Commands below the snapshot were replaced by it; those after it were applied one by one.
    assert (await commands.handle(command(2, gone))).status is AckStatus.NOT_APPLIED
    assert bench.parts.link.snapshot_seq == 5
    assert (await bench.store.meta()).snapshot_seq == 5


async def test_a_kept_lock_refuses_matching_grants_until_unlocked(bench: Bench) -> None:
    commands = bench.parts.commands
    lock = KeptLock("lck-" + "1" * 32, subject="alice", reason="INC-9")
    assert (await commands.handle(command(1, LockSpec(lock)))).status is AckStatus.APPLIED
    assert await bench.store.locks() == [lock]
    refused = await commands.handle(command(2, grant()))
    assert (refused.status, refused.reason) == (AckStatus.REJECTED, f"locked ({lock.lock_id})")
    # Batched grants are checked too (one by one under the lock), another pair is not locked.
    acks = await commands.handle_many(
        [command(3, grant()), command(4, grant(subject="bob")), command(5, grant())]
    )
    assert [a.status for a in acks] == [
        AckStatus.REJECTED,
        AckStatus.APPLIED,
        AckStatus.REJECTED,
    ]
    assert bench.hook.in_force == {("bob", "deploy")}
    unlocked = await commands.handle(command(6, UnlockSpec(lock.lock_id)))
    assert unlocked.status is AckStatus.APPLIED
    assert await bench.store.locks() == []
    assert (await commands.handle(command(7, grant()))).status is AckStatus.APPLIED
    assert PAIR in bench.hook.in_force


async def test_a_snapshot_replaces_the_kept_locks_only_when_it_says_so(bench: Bench) -> None:
    commands = bench.parts.commands
    old = KeptLock("lck-" + "1" * 32, action="deploy")
    new = KeptLock("lck-" + "2" * 32, subject="carol")
    await commands.handle(command(1, LockSpec(old)))
    await commands.handle(command(2, SnapshotSpec(grants=())))
    assert await bench.store.locks() == [old]
    await commands.handle(command(3, SnapshotSpec(grants=(), locks=(new,))))
    assert await bench.store.locks() == [new]
    assert (await commands.handle(command(4, grant()))).status is AckStatus.APPLIED
