"""A whole-fleet lock hands its lock commands out in short steps, one write transaction per batch
of agents (server/domain/locks.py): every agent that keeps locks gets exactly one, also when the
handout stops half-way (`run` finishes it, at start and every minute) or the lock is lifted
half-way (every agent is then told to forget it, and none gets the lock after the unlock). A
lift writes its unlocks in its own transaction (so no command written after the lift overtakes
them). On both real stores (SQLite, PostgreSQL); batches of 2 over 5 agents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from jitmesh.clock import FakeClock
from jitmesh.types import LockTarget
from server.domain.hub import Hub
from server.domain.locks import LockService
from server.domain.models import ADMIN_GROUP, Command, Principal
from server.domain.ports import Tx
from server.store.postgres import PostgresStore
from server.store.sqlite import SqliteStore
from tests.server.helpers import T0
from tests.support import postgres

AnyStore = SqliteStore | PostgresStore

ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))
AGENTS = ("a-1", "a-2", "a-3", "a-4", "a-5")


class Sink:
    def __init__(self) -> None:
        self.pushed: list[tuple[str, int, str]] = []

    def push(self, commands: Sequence[Command]) -> None:
        self.pushed += [(c.agent, c.seq, c.kind.value) for c in commands]

    def connected(self, agent: str) -> bool:
        return True

    def disconnect(self, agent: str, reason: str) -> None:
        raise AssertionError("a lock disconnects nobody")


class Stops:
    """The store, with its `write`s failing after the first `n` (a store gone away)."""

    def __init__(self, store: AnyStore, n: int) -> None:
        self._store = store
        self._left = n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write(self, work: Callable[[Tx], Awaitable[Any]]) -> Any:
        self._left -= 1
        if self._left < 0:
            raise RuntimeError("stopped")
        return await self._store.write(work)


@pytest.fixture(params=["sqlite", "postgresql"])
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    store: AnyStore
    if request.param == "postgresql":
        async with postgres.fresh_schema() as dsn:
            store = await PostgresStore.open(dsn, min_size=1, max_size=4)
            try:
                yield await _enrolled(store)
            finally:
                await store.close()
    else:
        store = await SqliteStore.open(tmp_path / "store.db")
        try:
            yield await _enrolled(store)
        finally:
            await store.close()


async def _enrolled(store: AnyStore) -> AnyStore:
    async with store.transaction() as tx:
        for name in AGENTS:
            await tx.enroll_agent(name, {}, f"hash-{name}", T0)
        # A 0.1 agent keeps no locks: it gets none of the commands.
        await tx.agent_seen("a-4", T0, version="0.1.0")
    return store


def service(store: Any, sink: Sink) -> LockService:
    return LockService(store, sink, Hub(), FakeClock(T0), batch=2)


async def log(store: AnyStore) -> list[tuple[str, int, str]]:
    return [
        (name, c.seq, c.kind.value)
        for name in AGENTS
        for c in await store.commands_after(name, 0, 100)
    ]


async def test_a_whole_fleet_lock_reaches_every_agent_in_short_steps(fleet: AnyStore) -> None:
    sink = Sink()
    before = fleet.commits
    lock, _, _ = await service(fleet, sink).create(ADMIN, LockTarget(subject="alice"), "r", None)
    # The lock's own transaction, then one per 2 agents (the last one short: done).
    assert fleet.commits - before == 1 + 3
    expected = [(name, 1, "lock") for name in AGENTS if name != "a-4"]
    assert await log(fleet) == expected
    assert sorted(sink.pushed) == expected
    assert await fleet.locks_handing_out() == []
    sink.pushed.clear()
    before = fleet.commits
    await service(fleet, sink).lift(ADMIN, lock.id, "done")
    # One transaction: every unlock comes before anything written after the lift.
    assert fleet.commits - before == 1
    assert [row for row in await log(fleet) if row[2] == "unlock"] == [
        (name, 2, "unlock") for name in AGENTS if name != "a-4"
    ]
    assert sorted(sink.pushed) == [(name, 2, "unlock") for name in AGENTS if name != "a-4"]


async def test_a_lock_naming_an_agent_is_one_transaction(fleet: AnyStore) -> None:
    sink = Sink()
    before = fleet.commits
    await service(fleet, sink).create(ADMIN, LockTarget(agent="a-2"), "r", None)
    assert fleet.commits - before == 1
    assert await log(fleet) == [("a-2", 1, "lock")]
    assert sink.pushed == [("a-2", 1, "lock")]


async def test_a_handout_stopped_half_way_is_finished_once_by_the_next_pass(
    fleet: AnyStore,
) -> None:
    sink = Sink()
    # The lock's transaction and one step commit; then the store fails: the lock is created all
    # the same (it is in force), its handout left for the next pass.
    lock, _, _ = await service(Stops(fleet, 1), sink).create(
        ADMIN, LockTarget(subject="alice"), "r", None
    )
    assert [k.id for k in await fleet.list_locks(include_ended=False, now=T0)] == [lock.id]
    assert await log(fleet) == [("a-1", 1, "lock"), ("a-2", 1, "lock")]
    assert await fleet.locks_handing_out() == [lock.id]
    # `run`'s pass (at start, and every minute) finishes it; a second finds nothing to do.
    again = service(fleet, sink)
    await again.finish_handouts()
    await again.finish_handouts()
    assert await log(fleet) == [(name, 1, "lock") for name in AGENTS if name != "a-4"]
    assert await fleet.locks_handing_out() == []


async def test_a_lock_lifted_half_way_ends_with_an_unlock_everywhere(fleet: AnyStore) -> None:
    sink = Sink()
    await service(Stops(fleet, 1), sink).create(ADMIN, LockTarget(subject="alice"), "r", None)
    (lock_id,) = await fleet.locks_handing_out()
    # The handout stalls; the lift still reaches everyone, in its own transaction.
    await service(Stops(fleet, 0), sink).lift(ADMIN, lock_id, "false alarm")
    assert await fleet.locks_handing_out() == []
    # Every agent that keeps locks is told to forget it (those that never got it too: an
    # unknown lock is no error), and nobody gets the lock after the unlock.
    assert await log(fleet) == [
        ("a-1", 1, "lock"),
        ("a-1", 2, "unlock"),
        ("a-2", 1, "lock"),
        ("a-2", 2, "unlock"),
        ("a-3", 1, "unlock"),
        ("a-5", 1, "unlock"),
    ]
    await service(fleet, sink).finish_handouts()
    assert len(await log(fleet)) == 6
