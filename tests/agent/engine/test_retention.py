"""Retention: ended leases leave the lease table once kept long enough, on a fake clock and a
real SQLite table; a revoked grant is never re-applied across the pruning (P3)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

from agent.domain.commands import AckStatus, RevokeSpec
from agent.domain.leases import LeaseState, tombstone
from agent.engine.retention import PAGE
from jitmesh.durations import MAX_DURATION
from tests.agent.factories import T0, command, grant, lease

from .conftest import Bench

DAY = timedelta(days=1)
SKEW = timedelta(seconds=60)


async def rows(bench: Bench) -> dict[str, LeaseState]:
    page = await bench.store.ended_leases(limit=10_000)
    active = await bench.store.active_leases()
    return {row.grant_id: row.state for row in [*page, *active]}


async def test_ended_rows_go_after_their_time_and_active_ones_stay(
    build: Callable[..., Bench],
) -> None:
    bench = build(skew=SKEW)
    bench.parts.time.start(await bench.store.meta())
    live = lease(length=2 * MAX_DURATION)
    expired = lease(action="logs", length=timedelta(minutes=10))
    revoked = lease(action="restart", length=timedelta(hours=8))
    await bench.put(
        live,
        expired.ended(at=expired.not_after, reason="expired"),
        revoked.ended(at=T0 + timedelta(hours=1), reason="revoked"),
        tombstone("grt-buried", seq=1, at=T0, reason="revoked"),
    )
    retention = bench.parts.retention
    assert await retention.prune() == 0
    await bench.clock.advance(7 * DAY)
    assert await retention.prune() == 0  # the expired one ended 10 minutes after T0
    await bench.clock.advance(timedelta(minutes=10))
    assert await retention.prune() == 1
    assert expired.grant_id not in await rows(bench)
    await bench.clock.advance(MAX_DURATION - 7 * DAY - timedelta(minutes=10) + SKEW)
    assert await retention.prune() == 1  # the tombstone (the revoke of an unseen grant, at T0)
    await bench.clock.advance(timedelta(hours=1))
    assert await retention.prune() == 1  # the lease revoked an hour after T0
    assert await rows(bench) == {live.grant_id: LeaseState.ACTIVE}


async def test_nothing_is_pruned_while_the_clock_is_not_believed(
    build: Callable[..., Bench],
) -> None:
    bench = build(skew=SKEW)
    bench.parts.time.start(await bench.store.meta())
    row = lease(length=timedelta(minutes=1))
    await bench.put(row.ended(at=row.not_after, reason="expired"))
    await bench.clock.advance(30 * DAY)
    bench.parts.time.skewed = True
    assert await bench.parts.retention.prune() == 0
    bench.parts.time.skewed = False
    bench.parts.time.untrusted = True
    assert await bench.parts.retention.prune() == 0
    bench.parts.time.untrusted = False
    assert await bench.parts.retention.prune() == 1


async def test_pages_through_more_rows_than_one_page(build: Callable[..., Bench]) -> None:
    bench = build(skew=SKEW)
    bench.parts.time.start(await bench.store.meta())
    many = [lease(action=f"a{i}", length=timedelta(minutes=1)) for i in range(PAGE + 7)]
    await bench.put(*(row.ended(at=row.not_after, reason="expired") for row in many))
    await bench.clock.advance(8 * DAY)
    assert await bench.parts.retention.prune() == PAGE + 7
    assert await rows(bench) == {}


async def test_the_loop_prunes_every_hour_of_the_clock(build: Callable[..., Bench]) -> None:
    bench = build(skew=SKEW)
    bench.parts.time.start(await bench.store.meta())
    row = lease(length=timedelta(minutes=1))
    await bench.put(row.ended(at=row.not_after, reason="expired"))
    loop = asyncio.create_task(bench.parts.retention.run())
    try:
        await bench.clock.advance(7 * DAY + timedelta(minutes=1))
        # The loop's first pass ran at T0 (nothing due); the hour's sleep ends with the advance.
        async with asyncio.timeout(10):
            while row.grant_id in await rows(bench):
                await bench.clock.advance(timedelta(hours=1))
    finally:
        loop.cancel()


async def test_a_revoked_grant_is_never_reapplied_before_or_after_its_row_goes(
    build: Callable[..., Bench],
) -> None:
    """P3 across pruning: a copy of a revoked grant (or of one revoked before it arrived) that
    comes late, with the longest window the agent accepts, is refused while the row is kept
    (the row refuses it) and after it is gone (expired on arrival)."""
    bench = build(skew=SKEW)
    bench.parts.time.start(await bench.store.meta())
    commands = bench.parts.commands
    seen = grant(length=timedelta(hours=8))
    assert (await commands.handle(command(1, seen))).status is AckStatus.APPLIED
    assert (await commands.handle(command(2, RevokeSpec(seen.grant_id)))).status is (
        AckStatus.APPLIED
    )
    unseen = grant(action="restart", length=MAX_DURATION)
    assert (await commands.handle(command(3, RevokeSpec(unseen.grant_id)))).status is (
        AckStatus.APPLIED
    )
    # The longest copies that could have been issued before the revokes (at T0).
    late = [
        grant(grant_id=seen.grant_id, length=MAX_DURATION),
        grant(grant_id=unseen.grant_id, action="restart", length=MAX_DURATION),
    ]
    seq = 3
    for step in (DAY, MAX_DURATION - DAY, SKEW - timedelta(seconds=1), timedelta(seconds=2)):
        await bench.clock.advance(step)
        await bench.parts.retention.prune()
        for spec in late:
            seq += 1
            ack = await commands.handle(command(seq, spec))
            assert ack.status is AckStatus.REJECTED, (step, ack)
    assert await rows(bench) == {}
    assert bench.hook.count("apply", ("alice", "deploy")) == 1
    assert bench.hook.count("apply", ("alice", "restart")) == 0
