"""What replicas share through the store, on every store: concurrent writers (several tasks;
on PostgreSQL several store objects, i.e. replicas) extend one audit chain with no fork or gap
and number each agent's commands without a gap; `write` runs a function again after a
serialization failure or deadlock; due rows are moved once however many sweep at once; signed
checkpoints and meta live in the store."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from jitmesh.types import GrantState, Lock, LockTarget, RequestState
from server.domain.audit import verify_chain
from server.domain.models import AuditEntry, Checkpoint, CommandKind, GrantChange, ObservedKind
from server.domain.ports import Store, Tx
from server.store.postgres import PostgresStore
from tests.server.helpers import T0, make_grant, make_request
from tests.store.conftest import Opener
from tests.store.test_contract import enroll


async def replicas(store: Store, reopen: Opener, n: int) -> list[Store]:
    """`n` stores on the one database: the same object on SQLite (one process by design),
    separate stores with their own connection pools on PostgreSQL."""
    if store.__class__.__name__ == "SqliteStore":
        return [store] * n
    return [store, *[await reopen() for _ in range(n - 1)]]


async def test_concurrent_writers_extend_one_chain_and_number_commands_without_gaps(
    store: Store, reopen: Opener
) -> None:
    await enroll(store, "web-1", "db-1")
    grants = [make_grant(request_id=f"req-{i}", agent="web-1") for i in range(60)]
    async with store.transaction() as tx:
        await tx.insert_grants(grants)
    stores = await replicas(store, reopen, 3)

    async def one(k: int, grant_id: str) -> None:
        async def work(tx: Tx) -> None:
            await tx.append_command("web-1", CommandKind.GRANT, grant_id, T0)
            await tx.audit(AuditEntry(ObservedKind("test.write"), f"w{k}", T0, grant_id=grant_id))
            await tx.audit_many(
                [
                    AuditEntry(ObservedKind("test.more"), f"w{k}", T0, details={"i": str(i)})
                    for i in range(3)
                ]
            )

        await stores[k % len(stores)].write(work)

    await asyncio.gather(*(one(k, g.id) for k, g in enumerate(grants)))
    chain = await store.audit_chain(0, 10_000)
    assert [e.seq for e in chain] == list(range(1, 4 * len(grants) + 1))
    assert verify_chain(chain).ok
    assert await store.audit_head() == (chain[-1].seq, chain[-1].hash)
    commands = await store.commands_after("web-1", 0, 1000)
    assert [c.seq for c in commands] == list(range(1, len(grants) + 1))
    assert sorted(c.grant_id for c in commands) == sorted(g.id for g in grants)


async def test_write_runs_the_function_again_after_a_deadlock(store: Store, reopen: Opener) -> None:
    """Two writers lock two rows in opposite orders: on PostgreSQL one of them is chosen as
    the deadlock victim and run again from the start (at least once); on SQLite they simply
    take turns. Both commit, each exactly once."""
    await enroll(store, "web-1", "db-1")
    stores = await replicas(store, reopen, 2)
    for s in stores:
        if isinstance(s, PostgresStore):
            # Writers that take the audit head first never deadlock: let them overlap, as
            # with head_first=False, so that the retry is what is tested here.
            s.head_first = False
    both_hold_one = asyncio.Barrier(2) if stores[0] is not stores[1] else None
    runs = {"a": 0, "b": 0}

    def writer(name: str, first: str, second: str) -> object:
        async def work(tx: Tx) -> None:
            runs[name] += 1
            await tx.agent_seen(first, T0)
            if both_hold_one is not None and runs[name] == 1:
                async with asyncio.timeout(10):
                    await both_hold_one.wait()
            await tx.agent_seen(second, T0)
            await tx.audit(AuditEntry(ObservedKind("test.deadlock"), name, T0))

        return work

    await asyncio.gather(
        stores[0].write(writer("a", "web-1", "db-1")),  # type: ignore[arg-type]
        stores[1].write(writer("b", "db-1", "web-1")),  # type: ignore[arg-type]
    )
    chain = await store.audit_chain(0, 100)
    assert sorted(e.actor for e in chain) == ["a", "b"]
    assert verify_chain(chain).ok
    if both_hold_one is not None:
        # A victim ran again (its retry may meet another conflict under load: the count of
        # retries is the server's to choose; each writer committing once is checked above).
        assert max(runs.values()) >= 2, runs


async def test_write_returns_the_function_result_and_rolls_back_on_error(store: Store) -> None:
    async def ok(tx: Tx) -> int:
        await tx.set_meta("k", "v")
        return 7

    async def fails(tx: Tx) -> None:
        await tx.set_meta("k", "changed")
        raise RuntimeError("no")

    assert await store.write(ok) == 7
    with pytest.raises(RuntimeError):
        await store.write(fails)
    assert await store.get_meta("k") == "v"


async def test_sweeps_on_several_replicas_move_each_due_row_once(
    store: Store, reopen: Opener
) -> None:
    grants = [make_grant(request_id=f"req-{i}", duration=timedelta(minutes=1)) for i in range(300)]
    requests = [make_request(created_at=T0 - timedelta(hours=2)) for _ in range(50)]
    async with store.transaction() as tx:
        await tx.insert_grants(grants)
        await tx.insert_requests(requests)
    stores = await replicas(store, reopen, 3)
    now = T0 + timedelta(minutes=5)

    async def sweep(s: Store) -> list[str]:
        moved: list[str] = []
        while True:

            async def batch(tx: Tx) -> list[str]:
                done = await tx.move_due_grants(
                    now, 40, state=GrantState.EXPIRED, change=GrantChange(ended_at=now)
                )
                ended = await tx.move_due_requests(
                    now, 40, state=RequestState.EXPIRED, by="coordinator", reason="late"
                )
                return [m.id for m in done + ended]

            ids = await s.write(batch)
            if not ids:
                return moved
            moved.extend(ids)

    results = await asyncio.gather(*(sweep(s) for s in stores))
    everything = [i for r in results for i in r]
    assert sorted(everything) == sorted([g.id for g in grants] + [r.id for r in requests])
    assert len(everything) == len(set(everything))


async def test_checkpoints_and_meta_live_in_the_store(store: Store, reopen: Opener) -> None:
    assert await store.last_checkpoint() is None
    first = Checkpoint(3, "a" * 64, T0, "ed25519:k1", b"s" * 64)
    second = Checkpoint(9, "b" * 64, T0 + timedelta(seconds=10), "ed25519:k1", b"t" * 64)
    await store.add_checkpoint(first)
    await store.add_checkpoint(second)
    async with store.transaction() as tx:
        await tx.set_meta("epoch", "4")
        assert await tx.get_meta("epoch") == "4"
    again = (await replicas(store, reopen, 2))[1]
    assert await again.checkpoints() == [first, second]
    assert await again.last_checkpoint() == second
    assert await again.get_meta("epoch") == "4"


async def test_locks_match_and_end(store: Store) -> None:
    await enroll(store, "web-1", "db-1")
    target = LockTarget(subject="alice", agent="web-1", action="")
    lock = Lock("lck-1", target, "incident", "admin", T0)
    on_web = make_grant(request_id="req-a", agent="web-1", state=GrantState.ACTIVE)
    other = make_grant(request_id="req-b", agent="db-1", state=GrantState.ACTIVE)
    pending = make_request(subject="alice")
    async with store.transaction() as tx:
        await tx.insert_grants([on_web, other])
        await tx.insert_requests([pending])
        await tx.insert_lock(lock)
        assert await tx.get_lock("lck-1") == lock
        assert [g.id for g in await tx.locked_grants(lock.target, [GrantState.ACTIVE])] == [
            on_web.id
        ]
        assert [r.id for r in await tx.locked_requests(lock.target)] == [pending.id]
        assert await tx.locks_in_force(T0) == [lock]
    assert await store.lock_in_force("ALICE", "web-1", "deploy", T0) == lock
    assert await store.lock_in_force("alice", "db-1", "deploy", T0) is None
    async with store.transaction() as tx:
        assert await tx.lift_lock("lck-1", T0, "admin", "over")
        assert not await tx.lift_lock("lck-1", T0, "admin", "again")
    assert await store.lock_in_force("alice", "web-1", "deploy", T0) is None
    assert [x.id for x in await store.list_locks(include_ended=True, now=T0)] == ["lck-1"]
    assert await store.list_locks(include_ended=False, now=T0) == []


async def test_agents_and_locks_read_together(store: Store) -> None:
    """What a new request reads: the enrolled agents among the names, and the locks in force
    at the time given, oldest first (lifted and expired ones left out)."""
    await enroll(store, "web-1", "db-1", "gone-1")
    at = T0 + timedelta(minutes=1)
    older = Lock("lck-b", LockTarget(agent="web-1"), "incident", "admin", T0)
    newer = Lock(
        "lck-a", LockTarget(subject="alice"), "x", "admin", at, expires_at=at + timedelta(hours=1)
    )
    lifted = Lock("lck-c", LockTarget(action="deploy"), "x", "admin", T0)
    expired = Lock("lck-d", LockTarget(action="deploy"), "x", "admin", T0, expires_at=at)
    lasting = Lock(
        "lck-e", LockTarget(action="ssh"), "x", "admin", at, expires_at=at + timedelta(hours=2)
    )
    async with store.transaction() as tx:
        for lock in (newer, older, lifted, expired, lasting):
            await tx.insert_lock(lock)
        assert await tx.lift_lock("lck-c", T0, "admin", "over")
        assert await tx.remove_agent("gone-1", T0)
    agents, locks = await store.agents_and_locks(["web-1", "db-1", "gone-1", "nobody"], at)
    assert agents == await store.agents_named(["web-1", "db-1"])
    assert sorted(agents) == ["db-1", "web-1"]
    assert [lock.id for lock in locks] == ["lck-b", "lck-a", "lck-e"]
    assert await store.agents_and_locks([], at) == ({}, locks)
