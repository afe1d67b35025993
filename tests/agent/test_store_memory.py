"""The in-memory lease store keeps the SQLite store's rules (run side by side on one script)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.leases import EventKind, LeaseState, new_event
from agent.domain.removals import Removal
from agent.store.base import LeaseStore
from agent.store.memory import MemoryLeaseStore
from agent.store.sqlite import SqliteLeaseStore

from .factories import T0, lease


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LeaseStore]:
    opened: LeaseStore = (
        SqliteLeaseStore.open(tmp_path) if request.param == "sqlite" else MemoryLeaseStore()
    )
    await opened.claim("web-1", "boot-a")
    yield opened
    opened.close()


async def test_same_rules(store: LeaseStore) -> None:
    item = lease(seq=3)
    await store.record_command(seq=3, epoch=2, writes=[item])
    await store.note_epoch(1)
    meta = await store.meta()
    assert (meta.last_applied_seq, meta.epoch) == (3, 2)
    assert await store.mark_applied(item.grant_id, T0)
    ended = item.ended(at=T0, reason="expired")
    event = new_event(EventKind.GRANT_EXPIRED, at=T0, lease=item)
    assert await store.end_lease(ended, event)
    assert not await store.end_lease(ended, event)
    assert not await store.mark_applied(item.grant_id, T0)
    assert (await store.lease(item.grant_id)).state is LeaseState.REMOVED  # type: ignore[union-attr]
    await store.add_event(event)
    assert [e.event_id for e in await store.pending_events(10)] == [event.event_id]
    assert await store.delete_events([event.event_id, "other"]) == 1
    await store.note_wall(T0 + timedelta(seconds=5))
    await store.note_wall(T0)
    assert (await store.meta()).last_wall_at == T0 + timedelta(seconds=5)
    assert await store.active_leases() == []


async def test_pending_removals_same_rules(store: LeaseStore) -> None:
    owed = Removal(("alice", "deploy"), ("grt-1",), attempts=1, next_at=T0, since=T0, error="x")
    event = new_event(EventKind.GRANT_REVOKE_FAILED, at=T0, grant_id="grt-1")
    await store.save_removal(owed, [event])
    again = Removal(("alice", "deploy"), ("grt-1", "grt-2"), 2, T0, T0, "y", reported=True)
    await store.save_removal(again)
    await store.save_removal(Removal(("bob", "ssh"), (), 1, T0, T0))
    assert [r.pair for r in await store.removals()] == [("alice", "deploy"), ("bob", "ssh")]
    assert (await store.removals())[0] == again
    done = new_event(EventKind.GRANT_REMOVED, at=T0, grant_id="grt-1")
    await store.drop_removal(("alice", "deploy"), [done])
    await store.drop_removal(("carol", "none"))
    assert [r.pair for r in await store.removals()] == [("bob", "ssh")]
    assert [e.event_id for e in await store.pending_events(10)] == [event.event_id, done.event_id]


async def test_ended_rows_are_listed_in_pages_and_only_they_are_deleted(store: LeaseStore) -> None:
    live = lease(action="live")
    ended = [lease(action=f"a{i}").ended(at=T0, reason="expired") for i in range(5)]
    await store.record_command(seq=1, epoch=1, writes=[live, *ended])
    ids = sorted(row.grant_id for row in ended)
    first = await store.ended_leases(limit=3)
    rest = await store.ended_leases(after=first[-1].grant_id, limit=3)
    assert [row.grant_id for row in [*first, *rest]] == ids
    assert all(row.state is LeaseState.REMOVED for row in first)
    # An active lease is never deleted, even when named.
    assert await store.delete_ended([live.grant_id, ids[0], ids[1], "grt-unknown"]) == 2
    assert [row.grant_id for row in await store.ended_leases()] == ids[2:]
    assert [row.grant_id for row in await store.active_leases()] == [live.grant_id]


async def test_active_leases_of_reads_the_pairs_asked_only(store: LeaseStore) -> None:
    early = lease("alice", "deploy", length=timedelta(minutes=5))
    late = lease("alice", "deploy", length=timedelta(minutes=30))
    other = lease("alice", "restart")
    bob = lease("bob", "deploy")
    ended = lease("alice", "deploy", state=LeaseState.REMOVED)
    await store.record_command(seq=1, epoch=1, writes=[late, other, bob, early, ended])
    of = store.active_leases_of
    # Only active leases of the pairs named, in active_leases' order (by not_after).
    assert [x.grant_id for x in await of([("alice", "deploy")])] == [early.grant_id, late.grant_id]
    assert [x.grant_id for x in await of([("bob", "deploy"), ("alice", "restart")])] == [
        other.grant_id,
        bob.grant_id,
    ]
    assert await of([("carol", "deploy")]) == []
    assert await of([]) == []
    # An end the store keeps elsewhere than the row counts the same in both reads.
    await store.end_lease(early.ended(at=T0, reason="expired"))
    assert [x.grant_id for x in await of([("alice", "deploy")])] == [late.grant_id]
    assert [x for x in await store.active_leases() if x.pair == ("alice", "deploy")] == (
        await of([("alice", "deploy")])
    )
