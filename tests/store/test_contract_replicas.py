"""The replicas table on every store: a replica that reports itself is listed; one stopped on
purpose is not, and holds no agent stream any more."""

from __future__ import annotations

from datetime import timedelta

from server.domain.ports import Store
from tests.server.helpers import T0
from tests.store.test_contract import enroll


async def test_a_stopped_replica_is_no_longer_listed_and_holds_no_stream(store: Store) -> None:
    await store.replica_seen("ra", "10.0.0.1:7443", "0.2.0", T0, T0)
    await store.replica_seen("rb", "10.0.0.2:7443", "0.2.0", T0, T0)
    await store.replica_seen("rb", "10.0.0.2:7443", "0.2.0", T0, T0 + timedelta(seconds=10))
    await enroll(store, "web-1", "web-2")
    async with store.transaction() as tx:
        await tx.agent_seen("web-1", T0, replica="rb")
        await tx.agent_seen("web-2", T0, replica="ra")
    assert [(r.id, r.last_seen_at) for r in await store.list_replicas()] == [
        ("ra", T0),
        ("rb", T0 + timedelta(seconds=10)),
    ]
    await store.replica_stopped("rb")
    assert [r.id for r in await store.list_replicas()] == ["ra"]
    held = {a.name: a.replica for a in await store.list_agents()}
    assert held == {"web-1": "", "web-2": "ra"}
