"""Expiry: the sweep starts and ends leases on time from the table, keeps a lease whose removal
fails in force (and retries it with backoff), and plans its next wake."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta

from agent.domain.commands import Ack, AckStatus, RevokeSpec
from agent.domain.leases import EventKind, LeaseState, new_event
from tests.agent.factories import T0, command, grant, lease, revoke_after

from .conftest import Bench

PAIR = ("alice", "deploy")
MIN = timedelta(minutes=1)


async def test_a_lease_starts_and_ends_on_time(bench: Bench) -> None:
    expiry, hook = bench.parts.expiry, bench.hook
    later = lease(start=MIN, length=MIN, applied=False)
    await bench.put(later)
    assert await expiry.sweep() == 1.0  # nothing before the next deadline: at most MAX_NAP
    assert hook.in_force == set()
    await bench.clock.advance(MIN)
    await expiry.sweep()
    assert hook.in_force == {PAIR}
    await bench.clock.advance(MIN)
    await expiry.sweep()
    assert hook.in_force == set()
    stored = await bench.store.lease(later.grant_id)
    assert stored is not None
    assert stored.state is LeaseState.REMOVED
    assert [k for k, _, _ in await bench.kinds()] == [
        EventKind.GRANT_APPLIED,
        EventKind.GRANT_EXPIRED,
    ]


async def test_the_sweep_wakes_for_the_next_deadline(bench: Bench) -> None:
    await bench.put(lease(length=timedelta(milliseconds=300)))
    delay = await bench.parts.expiry.sweep()
    assert delay == 0.3
    assert bench.parts.expiry.next_sweep_at == T0 + timedelta(milliseconds=300)


async def test_an_end_whose_removal_fails_keeps_the_lease_and_backs_off(
    build: Callable[..., Bench],
) -> None:
    bench = build(retry_base=2.0)
    bench.parts.time.start(await bench.store.meta())
    held = lease(length=MIN)
    await bench.put(held)
    bench.hook.in_force.add(PAIR)
    bench.hook.fail_remove.add(PAIR)
    await bench.clock.advance(MIN)
    assert await bench.parts.expiry.sweep() == 1.0  # min(MAX_NAP, 2 s)
    stored = await bench.store.lease(held.grant_id)
    assert stored is not None
    assert stored.state is LeaseState.ACTIVE
    bench.hook.fail_remove.clear()
    await bench.parts.expiry.sweep()
    stored = await bench.store.lease(held.grant_id)
    assert stored is not None
    assert stored.state is LeaseState.REMOVED


async def test_offline_leases_end_after_their_grace(bench: Bench) -> None:
    link = bench.parts.link
    await link.reached()
    held = lease(length=timedelta(hours=1), offline=revoke_after(MIN))
    await bench.put(held)
    bench.hook.in_force.add(PAIR)
    await link.lost()
    await bench.clock.advance(MIN)
    await bench.parts.expiry.sweep()
    assert bench.hook.in_force == set()
    assert [(k, d) for k, _, d in await bench.kinds()] == [
        (EventKind.GRANT_REMOVED, {"reason": "offline"})
    ]


async def test_ending_everything_fails_closed(bench: Bench) -> None:
    await bench.put(lease(), lease("bob", "read", start=MIN, applied=False))
    bench.hook.in_force.add(PAIR)
    async with bench.parts.shared.lock:
        await bench.parts.expiry.end_everything(
            reason="clock_untrusted", event=new_event(EventKind.CLOCK_UNTRUSTED, at=T0)
        )
    assert await bench.store.active_leases() == []
    assert bench.hook.in_force == set()
    assert [k for k, _, _ in await bench.kinds()][-1] == EventKind.CLOCK_UNTRUSTED


async def test_the_loop_must_look_only_when_a_command_moves_its_plan(bench: Bench) -> None:
    expiry = bench.parts.expiry
    far = command(1, grant(length=timedelta(hours=1)))
    applied = Ack(1, AckStatus.APPLIED, "")
    assert expiry.must_look(far, applied)  # no plan yet
    await expiry.sweep()
    assert not expiry.must_look(far, applied)
    near = command(2, grant(length=timedelta(milliseconds=100)))
    assert expiry.must_look(near, applied)
    assert expiry.must_look(far, Ack(1, AckStatus.FAILED, "x"))
    # A revoke done ends a lease: nothing becomes due sooner. One whose removal failed is
    # looked at again.
    revoke = command(3, RevokeSpec("grt-1"))
    assert not expiry.must_look(revoke, applied)
    assert expiry.must_look(revoke, Ack(3, AckStatus.FAILED, "remove failed (retrying)"))


async def test_run_sweeps_when_leases_change(bench: Bench) -> None:
    task = asyncio.create_task(bench.parts.expiry.run())
    try:
        await bench.put(lease(length=MIN, applied=False))
        bench.parts.shared.leases_changed.set()
        async with asyncio.timeout(5):
            while PAIR not in bench.hook.in_force:
                await bench.clock.advance(timedelta(milliseconds=100))
        await bench.clock.advance(MIN)
        async with asyncio.timeout(5):
            while PAIR in bench.hook.in_force:
                await bench.clock.advance(timedelta(milliseconds=100))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
