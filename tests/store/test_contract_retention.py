"""Command-log retention on every store: the log is truncated behind each agent's acknowledged
prefix (`Tx.truncate_command_log`), keeping every command a resume can still ask for."""

from __future__ import annotations

from datetime import timedelta

from jitmesh.clock import FakeClock
from server.domain.models import CommandKind
from server.domain.ports import Store, Tx
from server.domain.retention import CommandLogRetention
from tests.server.helpers import T0
from tests.store.test_contract import enroll, grant_for


async def append(store: Store, agent: str, kind: CommandKind, grant_id: str) -> int:
    async with store.transaction() as tx:
        return await tx.append_command(agent, kind, grant_id, T0)


async def ack(store: Store, agent: str, *seqs: int, status: str = "APPLIED") -> None:
    async with store.transaction() as tx:
        await tx.ack_commands([(agent, seq, status, "") for seq in seqs], T0)


async def truncate(store: Store, limit: int = 1000) -> int:
    """One step; how many commands it deleted."""

    async def work(tx: Tx) -> int:
        return (await tx.truncate_command_log(limit)).commands

    return await store.write(work)


async def kept(store: Store, agent: str) -> list[int]:
    return [c.seq for c in await store.commands_after(agent, 0, 10_000)]


async def test_truncates_the_acknowledged_prefix_only(store: Store) -> None:
    await enroll(store, "web-1", "db-1")
    grants = [await grant_for(store) for _ in range(5)]
    for grant_id in grants:
        await append(store, "web-1", CommandKind.GRANT, grant_id)
    await append(store, "web-1", CommandKind.REVOKE, grants[0])
    # 1, 2 and 4 acked; 3 not: the prefix ends at 2, whatever was acked after the gap.
    await ack(store, "web-1", 1, 2, 4)
    assert await truncate(store) == 2
    assert await kept(store, "web-1") == [3, 4, 5, 6]
    assert await store.command_log_start("web-1") == 2
    assert await store.first_unacked_seq("web-1") == 3
    # An agent that never acked anything keeps its whole log.
    db_grant = await grant_for(store, "db-1")
    await append(store, "db-1", CommandKind.GRANT, db_grant)
    assert await truncate(store) == 0
    assert await kept(store, "db-1") == [1]
    assert await store.command_log_start("db-1") == 0
    # Once 3, 5 and 6 are acked (a refusal counts as acked), the log of web-1 is empty.
    await ack(store, "web-1", 3, 5)
    await ack(store, "web-1", 6, status="FAILED")
    assert await truncate(store) == 4
    assert await kept(store, "web-1") == []
    assert await store.command_log_start("web-1") == 6
    assert await truncate(store) == 0
    # The sequence goes on from where it was: the counter is the agent's, not the log's.
    assert await append(store, "web-1", CommandKind.REVOKE, grants[1]) == 7
    assert await kept(store, "web-1") == [7]


async def test_a_snapshot_whose_ack_was_lost_goes_once_later_commands_are_acked(
    store: Store,
) -> None:
    await enroll(store, "web-1")
    grant_id = await grant_for(store)
    await append(store, "web-1", CommandKind.GRANT, grant_id)
    await ack(store, "web-1", 1)
    snapshot = await append(store, "web-1", CommandKind.SNAPSHOT, "")
    await truncate(store)
    # The agent may still be applying the snapshot: its row (and so its ack) stays.
    assert await store.command_log_start("web-1") == 1
    assert await store.first_unacked_seq("web-1") is None
    revoke = await append(store, "web-1", CommandKind.REVOKE, grant_id)
    await ack(store, "web-1", revoke)
    await truncate(store)
    # A later command acked: the agent is past the snapshot, whose ack will never come.
    assert await store.command_log_start("web-1") == revoke
    assert snapshot < revoke
    assert await kept(store, "web-1") == []


async def test_truncates_in_batches(store: Store) -> None:
    await enroll(store, "web-1")
    grants = [await grant_for(store) for _ in range(7)]
    for grant_id in grants:
        await append(store, "web-1", CommandKind.GRANT, grant_id)
    await ack(store, "web-1", *range(1, 8))
    assert await truncate(store, limit=3) == 3
    assert await kept(store, "web-1") == [4, 5, 6, 7]
    retention = CommandLogRetention(store, FakeClock(), timedelta(minutes=1), batch=3)
    assert await retention.truncate() == 4
    assert await kept(store, "web-1") == []


async def test_the_log_stays_bounded_under_a_stream_of_grants(store: Store) -> None:
    """Grants and revokes keep coming; the agent acks each a few commands late. The log holds
    only what is not acknowledged, never the history."""
    await enroll(store, "web-1")
    retention = CommandLogRetention(store, FakeClock(), timedelta(minutes=1), batch=50)
    sizes = []
    acked = 0
    for round_ in range(40):
        grant_id = await grant_for(store)
        await append(store, "web-1", CommandKind.GRANT, grant_id)
        last = await append(store, "web-1", CommandKind.REVOKE, grant_id)
        # Three commands stay unacknowledged at the end of every round.
        await ack(store, "web-1", *range(acked + 1, last - 2))
        acked = max(acked, last - 3)
        if round_ % 5 == 4:
            await retention.truncate()
            sizes.append(len(await kept(store, "web-1")))
    assert max(sizes) <= 3
    assert await store.first_unacked_seq("web-1") == 78
    assert await kept(store, "web-1") == [78, 79, 80]


async def test_agents_are_advanced_in_batches_too(store: Store) -> None:
    names = [f"web-{i}" for i in range(5)]
    await enroll(store, *names)
    for name in names:
        await append(store, name, CommandKind.GRANT, await grant_for(store, name))
        await ack(store, name, 1)

    async def step(tx: Tx) -> tuple[int, int]:
        done = await tx.truncate_command_log(2)
        return done.agents, done.commands

    # Two agents move their log_start, and only their commands can go.
    assert await store.write(step) == (2, 2)
    starts = [await store.command_log_start(name) for name in names]
    assert sorted(starts) == [0, 0, 0, 1, 1]
    assert await store.write(step) == (2, 2)
    assert await store.write(step) == (1, 1)
    assert await store.write(step) == (0, 0)
    assert [await store.command_log_start(name) for name in names] == [1] * 5
