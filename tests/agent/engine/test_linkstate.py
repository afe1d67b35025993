"""Link state: contact, the offline clock, the resume point and the outbox."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from agent.domain.leases import EventKind, new_event
from tests.agent.factories import T0, lease

from .conftest import Bench


async def test_offline_since_the_last_contact_until_reached(build: Callable[..., Bench]) -> None:
    bench = build()
    await bench.store.note_contact(T0 - timedelta(minutes=3))
    await bench.store.record_command(seq=7, epoch=2, writes=())
    meta = await bench.store.meta()
    bench.parts.time.start(meta)
    link = bench.parts.link
    link.load(meta)
    assert (link.offline_since, link.last_applied_seq, link.epoch) == (
        T0 - timedelta(minutes=3),
        7,
        2,
    )
    await link.reached()
    assert link.connected
    assert link.offline_since is None
    assert bench.parts.shared.leases_changed.is_set()
    assert (await bench.store.meta()).last_contact_at == T0


async def test_losing_the_coordinator_starts_the_offline_clock(bench: Bench) -> None:
    link, shared = bench.parts.link, bench.parts.shared
    await link.lost()  # not connected: nothing changes
    assert link.offline_since is None
    assert not shared.leases_changed.is_set()
    await link.reached()
    shared.leases_changed.clear()
    await bench.clock.advance(timedelta(seconds=30))
    await link.lost()
    assert not link.connected
    assert link.offline_since == T0 + timedelta(seconds=30)
    # revoke_after leases have an earlier deadline now: the expiry loop must look.
    assert shared.leases_changed.is_set()


async def test_the_epoch_only_rises(bench: Bench) -> None:
    link = bench.parts.link
    await link.note_epoch(3)
    await link.note_epoch(2)
    assert link.epoch == 3
    assert (await bench.store.meta()).epoch == 3
    link.applied(9, 1)
    assert (link.last_applied_seq, link.epoch) == (9, 3)


async def test_hello_names_the_active_grants(bench: Bench) -> None:
    live = lease()
    await bench.put(live, seq=4)
    bench.parts.link.applied(4, 1)
    hello = await bench.parts.link.hello_state()
    assert (hello.last_applied_seq, hello.active_grant_ids) == (4, (live.grant_id,))


async def test_delivered_events_leave_the_outbox(bench: Bench) -> None:
    event = new_event(EventKind.CLOCK_TRUSTED, at=T0)
    await bench.store.add_event(event)
    link, shared = bench.parts.link, bench.parts.shared
    assert [e.event_id for e in await link.pending_events(10)] == [event.event_id]
    await link.events_delivered(["evt-unknown"])
    assert not shared.outbox_changed.is_set()
    await link.events_delivered([event.event_id])
    assert await link.pending_events(10) == []
    assert shared.outbox_changed.is_set()


async def test_checkpoint_notes_the_contact_only_when_connected(bench: Bench) -> None:
    link = bench.parts.link
    await bench.clock.advance(timedelta(seconds=5))
    await link.checkpoint()
    meta = await bench.store.meta()
    assert (meta.last_wall_at, meta.last_contact_at) == (T0 + timedelta(seconds=5), None)
    await link.reached()
    await bench.clock.advance(timedelta(seconds=5))
    await link.checkpoint()
    assert (await bench.store.meta()).last_contact_at == T0 + timedelta(seconds=10)
