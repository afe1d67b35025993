"""The store contract for automatic-approval budgets, on every store: a budget read inside a
write transaction and the grant written after it are one step, so concurrent writers checking
the same (subject, rule) never both find it unused."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from jitmesh.types import GrantState, RequestState
from server.domain.ports import Store, Tx
from server.store.postgres import PostgresStore
from tests.server.helpers import T0, make_grant, make_request
from tests.store.conftest import Opener


async def test_a_budget_of_one_is_taken_once_by_concurrent_writers(store: Store) -> None:
    async def take() -> bool:
        async def work(tx: Tx) -> bool:
            if await tx.recent_auto_grants("alice", "auto", T0 - timedelta(days=1)):
                return False
            request = replace(
                make_request(state=RequestState.APPROVED),
                rule="auto",
                decided_by="policy:auto",
                decided_at=T0,
            )
            grant = make_grant(request_id=request.id, state=GrantState.PENDING_DELIVERY)
            await tx.insert_request(replace(request, grant_id=grant.id))
            await tx.insert_grant(grant)
            return True

        return await store.write(work)

    results = await asyncio.gather(*(take() for _ in range(6)))
    assert sum(results) == 1
    used = await store.recent_auto_grants("alice", "auto", T0 - timedelta(days=1))
    assert len(used) == 1


async def test_interleaved_replicas_take_turns_on_postgresql(store: Store, reopen: Opener) -> None:
    """The race itself, forced between two replicas: B reads the budget after A read it and
    before A commits. On PostgreSQL B must wait for A (on an advisory lock it can be seen
    waiting for); on SQLite B's transaction cannot even begin before A commits (one writer on
    the file), so there is nothing to force."""
    if not isinstance(store, PostgresStore):
        return
    other = await reopen()
    assert isinstance(other, PostgresStore)
    # With the audit head locked first (the default) every write transaction waits for the
    # one before it anyway; the budget's own lock is what holds when the head is locked late.
    store.head_first = other.head_first = False
    a_read, b_reading, b_read = asyncio.Event(), asyncio.Event(), asyncio.Event()
    since = T0 - timedelta(days=1)

    async def b_waits_for_a() -> bool:
        async with store._read() as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            row = await cur.fetchone()
        return bool(row and row["n"])

    async def insert(tx: Tx) -> None:
        request = replace(
            make_request(state=RequestState.APPROVED),
            rule="auto",
            decided_by="policy:auto",
            decided_at=T0,
        )
        grant = make_grant(request_id=request.id)
        await tx.insert_request(replace(request, grant_id=grant.id))
        await tx.insert_grant(grant)

    async def a(tx: Tx) -> bool:
        used = await tx.recent_auto_grants("alice", "auto", since)
        a_read.set()
        await b_reading.wait()
        async with asyncio.timeout(10):
            while not b_read.is_set() and not await b_waits_for_a():
                await asyncio.sleep(0.01)
        if used:
            return False
        await insert(tx)
        return True

    async def b(tx: Tx) -> bool:
        await a_read.wait()
        b_reading.set()
        used = await tx.recent_auto_grants("alice", "auto", since)
        b_read.set()
        if used:
            return False
        await insert(tx)
        return True

    results = await asyncio.gather(store.write(a), other.write(b))
    assert list(results) == [True, False]
