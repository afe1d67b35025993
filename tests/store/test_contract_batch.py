"""Batched store writes (the expiry sweep's): the same compare-and-set and the same hash chain
as the one-row methods."""

from __future__ import annotations

from datetime import timedelta

from jitmesh.types import GrantState
from server.domain.audit import reference_hash, verify_chain
from server.domain.models import AuditEntry, AuditKind, GrantChange, ObservedKind, new_ids
from server.domain.ports import Store
from tests.server.helpers import T0, make_grant


async def test_move_grants_moves_only_rows_in_an_expected_state(store: Store) -> None:
    grants = [make_grant(request_id=f"req{i}", agent="web-1") for i in range(1203)]
    async with store.transaction() as tx:
        for grant in grants:
            await tx.insert_grant(grant)
        ids = [g.id for g in grants]
        assert await tx.move_grant(ids[0], expected=[GrantState.PENDING_DELIVERY],
                                   state=GrantState.ACTIVE)  # fmt: skip
        moved = await tx.move_grants(
            [*ids, "grt_unknown"],
            expected=[GrantState.PENDING_DELIVERY],
            state=GrantState.EXPIRED,
            change=GrantChange(ended_at=T0 + timedelta(hours=2), end_reason="expired"),
        )
    assert moved == set(ids[1:])
    first, last = await store.get_grant(ids[0]), await store.get_grant(ids[-1])
    assert first is not None
    assert first.state is GrantState.ACTIVE
    assert last is not None
    assert last.state is GrantState.EXPIRED
    assert last.ended_at == T0 + timedelta(hours=2)
    assert last.end_reason == "expired"


async def test_audit_many_extends_the_chain_like_one_by_one(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.audit(AuditEntry(ObservedKind("before"), "a", T0, id="evt-0"))
        entries = [
            AuditEntry(AuditKind.GRANT_EXPIRED, "coordinator", T0, grant_id=f"g{i}", id=f"evt-{i}",
                       details={"action": "deploy", "was": "ACTIVE"})
            for i in range(1, 1204)
        ]  # fmt: skip
        # An id already stored (here, or earlier) is skipped, as with `audit`.
        written = await tx.audit_many(
            [*entries, AuditEntry(ObservedKind("dup"), "a", T0, id="evt-0")]
        )
        assert len(written) == len(entries)
        assert tx.new_audit[-1] == written[-1]
    async with store.transaction() as tx:
        after = await tx.audit(AuditEntry(ObservedKind("after"), "a", T0, id="evt-last"))
    chain = await store.audit_chain(0, 10_000)
    assert [e.id for e in chain] == ["evt-0", *(e.id for e in entries), "evt-last"]
    assert verify_chain(chain).ok
    assert after is not None
    assert await store.audit_head() == (after.seq, after.hash)


async def test_fresh_audit_batch_with_shared_details_chains_like_one_by_one(store: Store) -> None:
    # The sweep's form: ids made for the batch (no look-up), one details object shared by
    # many entries. The stored chain is the same as entry by entry, and the events keep the
    # details they were written with when the shared object changes later.
    shared = {"action": "deploy", "was": "ACTIVE"}
    ids = new_ids("evt", 1203)
    entries = [
        AuditEntry(AuditKind.GRANT_EXPIRED, "coordinator", T0, subject="alice",
                   agent=f"web-{i % 7}", request_id=f"req{i}", grant_id=f"g{i}", details=shared,
                   id=event_id)
        for i, event_id in enumerate(ids)
    ]  # fmt: skip
    async with store.transaction() as tx:
        await tx.audit(AuditEntry(ObservedKind("before"), "a", T0, id="evt-0"))
        written = await tx.audit_many(entries, fresh=True)
    shared["was"] = "REVOKING"
    assert [e.id for e in written] == ids
    assert all(e.details == {"action": "deploy", "was": "ACTIVE"} for e in written)
    assert all(e.hash == reference_hash(e) for e in written)
    chain = await store.audit_chain(0, 10_000)
    assert chain[1:] == written
    assert verify_chain(chain).ok
    assert await store.audit_head() == (written[-1].seq, written[-1].hash)
