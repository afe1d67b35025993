"""The store contract for lock commands in an agent's log, on every store: numbered with the
grant commands, read back with the lock they name (wire 0.2, docs/wire.md)."""

from __future__ import annotations

from jitmesh.types import Lock, LockTarget
from server.domain.models import CommandKind
from server.domain.ports import Store
from tests.server.helpers import T0, make_grant, make_request
from tests.store.test_contract import enroll


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
