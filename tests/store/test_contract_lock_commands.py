"""The store contract for lock commands in an agent's log, on every store: numbered with the
grant commands, read back with the lock they name (wire 0.2, docs/wire.md)."""

from __future__ import annotations

import psycopg
import pytest

from jitmesh.types import Lock, LockTarget
from server.domain.models import CommandKind
from server.domain.ports import Store
from server.store.postgres import PostgresStore
from tests.server.helpers import T0, make_grant, make_request
from tests.store.test_contract import enroll
from tests.support import postgres


async def test_lock_commands_are_read_back_with_their_lock(store: Store) -> None:
    await enroll(store, "web-1")
    lock = Lock(
        id="lck-" + "1" * 32,
        target=LockTarget(subject="alice"),
        reason="INC-9",
        created_by="admin",
        created_at=T0,
    )
    request = make_request(agent="web-1")
    grant = make_grant(request_id=request.id, agent="web-1")
    async with store.transaction() as tx:
        await tx.insert_request(request)
        await tx.insert_grant(grant)
        await tx.insert_lock(lock)
        seqs = await tx.append_commands(
            [
                ("web-1", CommandKind.GRANT, grant.id, T0),
                ("web-1", CommandKind.LOCK, lock.id, T0),
                ("web-1", CommandKind.UNLOCK, lock.id, T0),
            ]
        )
    assert seqs == [1, 2, 3]
    commands = await store.commands_after("web-1", 0, 10)
    assert [(c.seq, c.kind) for c in commands] == [
        (1, CommandKind.GRANT),
        (2, CommandKind.LOCK),
        (3, CommandKind.UNLOCK),
    ]
    assert commands[0].grant is not None
    assert commands[0].grant.id == grant.id
    assert commands[0].lock is None
    assert [c.grant for c in commands[1:]] == [None, None]
    assert [c.lock for c in commands[1:]] == [lock, lock]
    assert [c.seq for c in await store.commands_after("web-1", 2, 10)] == [3]


async def test_unsent_lock_commands_are_settled_once_without_moving_the_acked_seq(
    store: Store,
) -> None:
    """`unacked_lock_commands` lists an agent's lock commands nobody settled; `settle_unsent`
    marks them NOT_APPLIED, once, and leaves the agent's last acked seq where its acks put it."""
    await enroll(store, "web-1")
    await enroll(store, "db-1")
    lock = Lock(
        id="lck-" + "2" * 32,
        target=LockTarget(subject="alice"),
        reason="INC-9",
        created_by="admin",
        created_at=T0,
    )
    request = make_request(agent="web-1")
    grant = make_grant(request_id=request.id, agent="web-1")
    async with store.transaction() as tx:
        await tx.insert_request(request)
        await tx.insert_grant(grant)
        await tx.insert_lock(lock)
        await tx.append_commands(
            [
                ("web-1", CommandKind.GRANT, grant.id, T0),
                ("web-1", CommandKind.LOCK, lock.id, T0),
                ("db-1", CommandKind.LOCK, lock.id, T0),
                ("web-1", CommandKind.UNLOCK, lock.id, T0),
            ]
        )
        await tx.ack_commands([("web-1", 1, "APPLIED", "")], T0)
    unsent = await store.unacked_lock_commands("web-1")
    assert [(c.seq, c.kind, c.lock) for c in unsent] == [
        (2, CommandKind.LOCK, lock),
        (3, CommandKind.UNLOCK, lock),
    ]
    async with store.transaction() as tx:
        assert [c.seq for c in await tx.unacked_lock_commands("web-1")] == [2, 3]
        # 1 is acked already, 9 does not exist: only 2 and 3 are marked.
        assert await tx.settle_unsent("web-1", [1, 2, 3, 9], T0, "not sent") == [2, 3]
        assert await tx.settle_unsent("web-1", [2, 3], T0, "again") == []
    assert await store.unacked_lock_commands("web-1") == []
    assert [c.seq for c in await store.unacked_lock_commands("db-1")] == [1]
    assert await store.first_unacked_seq("web-1") is None
    agent = await store.get_agent("web-1")
    assert agent is not None
    assert agent.last_acked_seq == 1


async def test_a_lock_handout_is_stored_with_the_lock(store: Store) -> None:
    """Where a whole-fleet lock's handout stands: "" before the first agent, an agent's name,
    None when done; listed while not done. Agents are read after a name, in name order, without
    the removed ones."""
    await enroll(store, "web-2", "db-1", "web-1", "gone")
    async with store.transaction() as tx:
        await tx.agent_seen("web-2", T0, version="0.1.0")
        await tx.remove_agent("gone", T0)
    lock = Lock(
        id="lck-" + "3" * 32,
        target=LockTarget(subject="alice"),
        reason="INC-9",
        created_by="admin",
        created_at=T0,
    )
    async with store.transaction() as tx:
        await tx.insert_lock(lock)
        assert await tx.lock_handout(lock.id) is None
        await tx.set_lock_handout(lock.id, "")
        assert await tx.lock_handout(lock.id) == ""
        assert await tx.agents_after("", 2) == [("db-1", ""), ("web-1", "")]
        assert await tx.agents_after("web-1", 2) == [("web-2", "0.1.0")]
    assert await store.locks_handing_out() == [lock.id]
    async with store.transaction() as tx:
        await tx.set_lock_handout(lock.id, "web-1")
    async with store.transaction() as tx:
        assert await tx.lock_handout(lock.id) == "web-1"
        await tx.set_lock_handout(lock.id, None)
    assert await store.locks_handing_out() == []
    async with store.transaction() as tx:
        assert await tx.lock_handout(lock.id) is None
        assert await tx.lock_handout("lck-" + "4" * 32) is None


def _lock(digit: str) -> Lock:
    return Lock(
        id="lck-" + digit * 32,
        target=LockTarget(subject="alice"),
        reason="INC-9",
        created_by="admin",
        created_at=T0,
    )


async def test_a_held_lock_is_read_back(store: Store) -> None:
    lock = _lock("3")
    async with store.transaction() as tx:
        await tx.insert_lock(lock)
    async with store.transaction() as tx:
        assert await tx.hold_lock(lock.id) == lock
        assert await tx.hold_lock("lck-" + "4" * 32) is None


async def test_a_held_lock_row_stays_held_until_commit_on_postgresql() -> None:
    """A lift and a handout step of one lock take turns on its row (domain/locks.py), also when
    write transactions do not all queue on the audit head first."""
    lock = _lock("5")
    async with postgres.fresh_schema() as dsn:
        store = await PostgresStore.open(dsn, min_size=1, max_size=2)
        try:
            store.head_first = False
            async with store.transaction() as tx:
                await tx.insert_lock(lock)
            async with (
                store.transaction() as tx,
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other,
            ):
                await tx.hold_lock(lock.id)
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    await other.execute(
                        "SELECT id FROM locks WHERE id = %s FOR UPDATE NOWAIT", [lock.id]
                    )
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
                # Committed: free again.
                await other.execute(
                    "SELECT id FROM locks WHERE id = %s FOR UPDATE NOWAIT", [lock.id]
                )
        finally:
            await store.close()
