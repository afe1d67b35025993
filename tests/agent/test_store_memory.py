"""The in-memory lease store keeps the SQLite store's rules (run side by side on one script)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent.domain.leases import EventKind, LeaseState, new_event
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
