"""Removal retries: a failed removal is persisted, retried in the background with backoff,
reported REVOKE_FAILED once when the attempts run out, reported removed when it finally works,
and parked while a newer lease holds its pair."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from agent.domain.commands import Ack, AckStatus
from agent.domain.leases import EventKind
from tests.agent.factories import T0, lease

from .conftest import Bench

PAIR = ("alice", "deploy")
SEC = timedelta(seconds=1)


@contextlib.asynccontextmanager
async def retrying(bench: Bench) -> AsyncIterator[None]:
    async def loop() -> None:
        async with asyncio.TaskGroup() as tasks:
            await bench.parts.removals.run(tasks)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(bench: Bench, done: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not done():
            await bench.clock.advance(SEC)


async def started(build: Callable[..., Bench], **options: object) -> Bench:
    bench = build(**options)
    bench.parts.time.start(await bench.store.meta())
    return bench


async def test_a_pending_removal_is_persisted_and_retried_until_it_works(
    build: Callable[..., Bench],
) -> None:
    bench = await started(build, retries=3, retry_base=1.0)
    removals, hook = bench.parts.removals, bench.hook
    hook.fail_remove.add(PAIR)
    await removals.pend(PAIR, ["grt-1"], "hook failed")
    assert [r.pair for r in await bench.store.removals()] == [PAIR]
    assert removals.still_owed(Ack(5, AckStatus.APPLIED, "", "grt-1")) == Ack(
        5, AckStatus.FAILED, "removal pending: hook failed", "grt-1"
    )
    async with retrying(bench):
        await until(bench, lambda: removals.pending[PAIR].attempts >= 2)
        # The first attempt was the caller's own (inline); the second the first retry.
        assert hook.count("remove", PAIR) == 1
        hook.fail_remove.clear()
        await until(bench, lambda: PAIR not in removals.pending)
    assert await bench.store.removals() == []
    assert removals.still_owed(Ack(5, AckStatus.APPLIED, "", "grt-1")) is None
    assert await bench.kinds() == [
        (EventKind.GRANT_REMOVED, "grt-1", {"retried": "true", "attempts": "3"})
    ]


async def test_attempts_run_out_into_one_revoke_failed_report(
    build: Callable[..., Bench],
) -> None:
    bench = await started(build, retries=2, retry_base=1.0)
    removals, hook = bench.parts.removals, bench.hook
    hook.fail_remove.add(PAIR)
    await removals.pend(PAIR, ["grt-1", "grt-2"], "hook failed")
    assert await bench.kinds() == []
    async with retrying(bench):
        await until(bench, lambda: removals.pending[PAIR].attempts >= 4)
    reports = [(k, g) for k, g, _ in await bench.kinds()]
    assert reports == [
        (EventKind.GRANT_REVOKE_FAILED, "grt-1"),
        (EventKind.GRANT_REVOKE_FAILED, "grt-2"),
    ]
    assert removals.pending[PAIR].reported


async def test_a_pair_held_again_is_parked_not_removed(build: Callable[..., Bench]) -> None:
    bench = await started(build, retries=3, retry_base=1.0)
    removals, hook = bench.parts.removals, bench.hook
    await bench.put(lease(length=timedelta(hours=1)))
    await removals.pend(PAIR, ["grt-old"], "hook failed")
    async with retrying(bench):
        for _ in range(5):
            await bench.clock.advance(10 * SEC)
    assert hook.count("remove", PAIR) == 0
    assert PAIR in removals.pending
    # The holder's own end really removes the pair: the old removal is done with it.
    await removals.removed(PAIR, T0)
    assert [(k, g) for k, g, _ in await bench.kinds()] == [(EventKind.GRANT_REMOVED, "grt-old")]


async def test_removals_owed_from_before_a_restart_are_due_at_once(
    build: Callable[..., Bench],
) -> None:
    bench = await started(build, retry_base=60.0)
    await bench.parts.removals.pend(PAIR, ["grt-1"], "hook failed")
    later = T0 + timedelta(minutes=1)
    again = build()
    again_removals = again.parts.removals
    await again.store.save_removal((await bench.store.removals())[0])
    await again_removals.load(later)
    assert again_removals.pending[PAIR].next_at == later
    assert again_removals.owed() == {PAIR}
