"""The notification outbox on every store: a notifiable audit event lands in the outbox in its own
transaction, routing moves one cursor by compare-and-set, a claimed delivery is not claimed twice
(several senders, on PostgreSQL several replicas), attempts are logged, a removed receiver gives
up its pending deliveries, and pruning drops what is done."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from server.domain.models import AuditEntry, AuditKind, ObservedKind
from server.domain.ports import Store
from server.domain.receivers import DeliveryState, ReceiverKind, ReceiverSpec, Route
from server.store.postgres import PostgresOutbox, PostgresStore
from server.store.sqlite import SqliteOutbox
from tests.server.helpers import T0
from tests.store.conftest import Opener
from tests.store.test_contract_shared import replicas


def outbox_of(store: Store) -> SqliteOutbox | PostgresOutbox:
    if isinstance(store, PostgresStore):
        return PostgresOutbox(store)
    return SqliteOutbox(store)  # type: ignore[arg-type]


async def test_the_outbox_routes_claims_records_and_prunes(store: Store, reopen: Opener) -> None:
    spec = ReceiverSpec("hook", ReceiverKind.WEBHOOK, {"url": "http://x"}, "sealed", Route(),
                        T0, "admin")  # fmt: skip
    async with store.transaction() as tx:
        assert await tx.insert_receiver(spec)
        assert not await tx.insert_receiver(spec)
        await tx.audit(
            AuditEntry(AuditKind.REQUEST_CREATED, "alice", T0, request_id="req-1", id="e1")
        )
        await tx.audit(AuditEntry(ObservedKind("test.not_notifiable"), "alice", T0, id="e2"))
        await tx.audit(AuditEntry(AuditKind.REQUEST_DENIED, "bob", T0, request_id="req-1", id="e3"))
    outbox = outbox_of(store)
    assert [r.name for r in await outbox.list_receivers()] == ["hook"]
    cursor, notices = await outbox.unrouted(100)
    assert [n.id for _, n in notices] == ["e1", "e3"]
    upto = notices[-1][0]
    assert await outbox.route(cursor, upto, [(seq, "hook") for seq, _ in notices], T0)
    assert not await outbox.route(cursor, upto, [], T0)  # another sender routed them first
    assert (await outbox.unrouted(100))[1] == []

    # Two senders (two replicas on PostgreSQL) claim at once: each delivery goes to one.
    others = [outbox_of(s) for s in await replicas(store, reopen, 2)]
    claims = await asyncio.gather(*(o.claim(T0, T0 + timedelta(seconds=30), 10) for o in others))
    claimed = [d for c in claims for d in c]
    assert sorted(d.notice.id for d in claimed) == ["e1", "e3"]
    assert await outbox.claim(T0, T0 + timedelta(seconds=30), 10) == []
    first, second = sorted(claimed, key=lambda d: d.event_seq)
    await outbox.record(first, T0, True, "200", None)
    await outbox.record(second, T0, False, "503", T0 + timedelta(minutes=1))
    states = {d.event_id: d.state for d in await outbox.deliveries(
        receiver="", states=[], limit=10, before=0)}  # fmt: skip
    assert states == {"e1": DeliveryState.DELIVERED, "e3": DeliveryState.PENDING}
    assert await outbox.next_due() == T0 + timedelta(minutes=1)
    log = await outbox.log(request_id="req-1", receiver="", limit=10)
    assert sorted((a.event_id, a.ok) for a in log) == [("e1", True), ("e3", False)]

    async with store.transaction() as tx:
        assert await tx.delete_receiver("hook")
    states = {d.event_id: d.state for d in await outbox.deliveries(
        receiver="hook", states=[], limit=10, before=0)}  # fmt: skip
    assert states["e3"] is DeliveryState.GAVE_UP
    assert await outbox.prune(T0 + timedelta(days=1)) == 2
    assert await outbox.deliveries(receiver="", states=[], limit=10, before=0) == []
