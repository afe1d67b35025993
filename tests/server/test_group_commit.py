"""Group commit: concurrent writers share a transaction, and each still gets its own answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from jitmesh import GrantState, RequestState
from server.app import Coordinator
from server.domain.audit import verify_chain
from server.domain.batching import GroupCommit
from server.domain.errors import Conflict, Locked, NotFound, PermissionDenied, Unauthenticated
from server.domain.models import AckStatus, AgentAck, CommandKind, Principal
from server.domain.ports import Store
from server.store.sqlite import SqliteStore
from tests.server.helpers import ADMIN, T0, Env, make_grant

M15 = timedelta(minutes=15)


class Recorder:
    """A write function that records its batches and answers item * 10, failing chosen items
    on their own (`refuse`) or the whole batch they are in (`poison`)."""

    def __init__(self, refuse: int = -1, poison: int = -1) -> None:
        self.batches: list[list[int]] = []
        self.refuse = refuse
        self.poison = poison
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def write(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.poison in items:
            raise RuntimeError("the whole transaction failed")
        return [ValueError(f"bad {i}") if i == self.refuse else i * 10 for i in items]


async def test_concurrent_submissions_share_a_batch_and_get_their_own_results() -> None:
    recorder = Recorder(refuse=3)
    group: GroupCommit[int, int] = GroupCommit(recorder.write)
    results = await asyncio.gather(*(group.submit(i) for i in range(6)), return_exceptions=True)
    assert recorder.batches == [[0, 1, 2, 3, 4, 5]]
    assert results[:3] == [0, 10, 20]
    assert isinstance(results[3], ValueError)
    assert str(results[3]) == "bad 3"
    assert results[4:] == [40, 50]


async def test_callers_arriving_during_a_write_form_the_next_batch() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(recorder.write, max_batch=4)
    first = [asyncio.ensure_future(group.submit(i)) for i in range(5)]
    await asyncio.wait_for(recorder.started.wait(), 5)
    later = [asyncio.ensure_future(group.submit(i)) for i in range(5, 7)]
    recorder.gate.set()
    assert await asyncio.gather(*first, *later) == [i * 10 for i in range(7)]
    # At most max_batch per transaction; the ones waiting meanwhile go together.
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6]]


async def test_a_failing_transaction_is_retried_item_by_item() -> None:
    recorder = Recorder(poison=2)
    group: GroupCommit[int, int] = GroupCommit(recorder.write)
    results = await asyncio.gather(*(group.submit(i) for i in range(4)), return_exceptions=True)
    assert recorder.batches == [[0, 1, 2, 3], [0], [1], [2], [3]]
    assert results[:2] == [0, 10]
    assert isinstance(results[2], RuntimeError)
    assert results[3] == 30


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(recorder.write)
    leaver = asyncio.ensure_future(group.submit(1))
    stayer = asyncio.ensure_future(group.submit(2))
    await asyncio.wait_for(recorder.started.wait(), 5)
    leaver.cancel()
    recorder.gate.set()
    assert await stayer == 20
    await group.close()
    assert leaver.cancelled()


async def test_concurrent_creates_each_get_their_request_and_a_gap_free_command_log(
    env: Env,
) -> None:
    # Auto-approved (web-1, staging) and manual (db-1, prod) requests at once.
    calls = [
        env.alice.create_request(agent=agent, action="deploy", duration=M15, reason=f"r{i}")
        for i, agent in enumerate(["web-1", "db-1"] * 12)
    ]
    answers = await asyncio.gather(*calls)
    seqs = []
    for i, (request, grant) in enumerate(answers):
        assert request.reason == f"r{i}"
        stored = await env.admin.get_request(request.id)
        assert stored == request
        if request.agent == "web-1":
            assert request.state is RequestState.APPROVED
            assert grant is not None
            assert (grant.request_id, grant.state) == (request.id, GrantState.PENDING_DELIVERY)
            assert request.grant_id == grant.id
            assert await env.admin.get_grant(grant.id) == grant
            seqs.append(grant.grant_seq)
        else:
            assert request.state is RequestState.PENDING
            assert grant is None
    assert sorted(seqs) == list(range(1, 13))
    store = env.coordinator.store
    commands = await store.commands_after("web-1", 0, 100)
    assert [c.seq for c in commands] == list(range(1, 13))
    assert {c.grant_id for c in commands} == {g.id for _, g in answers if g is not None}
    chain = await store.audit_chain(0, 10_000)
    assert verify_chain(chain).ok
    kinds = [e.kind for e in chain if e.request_id == answers[0][0].id]
    assert kinds == ["request.created", "request.approved", "grant.created"]


async def test_a_create_that_fails_inside_the_batch_does_not_spoil_the_others(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = env.coordinator.store
    join, _ = await env.coordinator.fleet.create_join_token(ADMIN, {"env": "staging"}, None)
    await env.coordinator.fleet.enroll(join, "web-2", {})
    access = env.coordinator.access
    assert access is not None
    read = store.agents_and_locks
    reads = 0

    async def read_then_remove(names: Sequence[str], now: Any) -> Any:
        # web-2 is removed between its request's checks and the batch write.
        nonlocal reads
        reads += 1
        found = await read(names, now)
        if "web-2" in names:
            async with store.transaction() as tx:
                await tx.remove_agent("web-2", T0)
        return found

    monkeypatch.setattr(store, "agents_and_locks", read_then_remove)
    alice = Principal("alice", frozenset({"developers"}))
    # Asked together (in one turn of the loop): one read, then all four checked before any is
    # written, so they go into one batch.
    results = await asyncio.gather(
        *(
            access.create_request(alice, agent=a, action="deploy", duration=M15, reason="")
            for a in ["web-1", "web-1", "web-2", "web-1"]
        ),
        return_exceptions=True,
    )
    assert reads == 1
    assert isinstance(results[2], Conflict)
    seqs = []
    for answer in [r for i, r in enumerate(results) if i != 2]:
        assert not isinstance(answer, BaseException)
        request, grant = answer
        assert request.state is RequestState.APPROVED
        assert grant is not None
        seqs.append(grant.grant_seq)
    assert sorted(seqs) == [1, 2, 3]
    listed, _ = await store.list_requests(
        states=[], subject="alice", agent="web-2", limit=10, page_token=""
    )
    assert listed == []
    assert verify_chain(await store.audit_chain(0, 10_000)).ok


async def test_append_commands_numbers_each_agent_gap_free(store: SqliteStore) -> None:
    grants = [make_grant(request_id=f"req-{i}", agent="a" if i != 3 else "b") for i in range(5)]
    async with store.transaction() as tx:
        for name in ("a", "b"):
            assert await tx.enroll_agent(name, {}, f"hash-{name}", T0)
        assert await tx.remove_agent("b", T0)
        for grant in grants:
            await tx.insert_grant(grant)
    async with store.transaction() as tx:
        await tx.append_command("a", CommandKind.GRANT, grants[0].id, T0)
        seqs = await tx.append_commands(
            [(g.agent, CommandKind.GRANT, g.id, T0) for g in grants[1:]]
        )
    # In the order given, after the one already there; nothing for the removed agent.
    assert seqs == [2, 3, None, 4]
    commands = await store.commands_after("a", 0, 10)
    assert [(c.seq, c.grant_id) for c in commands] == [
        (1, grants[0].id),
        (2, grants[1].id),
        (3, grants[2].id),
        (4, grants[4].id),
    ]
    assert await store.commands_after("b", 0, 10) == []
    agent = await store.get_agent("a")
    assert agent is not None
    assert agent.last_seq == 4


async def test_concurrent_acks_are_each_recorded_once(env: Env) -> None:
    answers = await asyncio.gather(
        *(
            env.alice.create_request(agent=agent, action="deploy", duration=M15)
            for agent in ["web-1"] * 6
        )
    )
    grants = {g.grant_seq: g for _, g in answers if g is not None}
    web = Principal("web-1", kind="agent")
    fleet = env.coordinator.fleet
    # A repeat of seq 1 in the same batch, an unknown seq, and a failed apply among them.
    acks = [AgentAck(seq, AckStatus.APPLIED, "", grants[seq].id) for seq in range(1, 6)]
    acks += [
        AgentAck(1, AckStatus.APPLIED, "", grants[1].id),
        AgentAck(99, AckStatus.APPLIED, "", ""),
    ]
    acks.append(AgentAck(6, AckStatus.FAILED, "no such user", grants[6].id))
    await asyncio.gather(*(fleet.ack(web, ack) for ack in acks))
    for seq, grant in grants.items():
        stored = await env.admin.get_grant(grant.id)
        assert stored.state is (GrantState.FAILED if seq == 6 else GrantState.ACTIVE)
    chain = await env.coordinator.store.audit_chain(0, 10_000)
    assert verify_chain(chain).ok
    applied = [e for e in chain if e.kind == "grant.applied"]
    assert sorted(e.grant_id for e in applied) == sorted(grants[s].id for s in range(1, 6))
    assert all(e.actor == "agent:web-1" and "latency_ms" in e.details for e in applied)
    assert [e.details["reason"] for e in chain if e.kind == "grant.apply_failed"] == [
        "no such user"
    ]
    agent = await env.coordinator.store.get_agent("web-1")
    assert agent is not None
    assert agent.last_acked_seq == 6


async def test_ack_commands_answers_each_ack(store: SqliteStore) -> None:
    grants = [make_grant(request_id=f"req-{i}", agent="a") for i in range(3)]
    async with store.transaction() as tx:
        assert await tx.enroll_agent("a", {}, "hash-a", T0)
        for grant in grants:
            await tx.insert_grant(grant)
            await tx.append_command("a", CommandKind.GRANT, grant.id, T0)
        assert await tx.ack_commands([("a", 3, "APPLIED", "")], T0)
    async with store.transaction() as tx:
        done = await tx.ack_commands(
            [("a", 1, "APPLIED", ""), ("a", 2, "FAILED", "why"), ("a", 1, "APPLIED", ""),
             ("a", 3, "APPLIED", ""), ("b", 1, "APPLIED", ""), ("a", 7, "APPLIED", "")],
            T0 + M15,
        )  # fmt: skip
    # Only the first ack of each command: not a repeat, not one acked before, not another
    # agent's, not an unknown command.
    assert done == {
        ("a", 1): (CommandKind.GRANT, grants[0].id, T0),
        ("a", 2): (CommandKind.GRANT, grants[1].id, T0),
    }
    agent = await store.get_agent("a")
    assert agent is not None
    assert agent.last_acked_seq == 3
    assert agent.last_seen_at == T0 + M15
    assert await store.first_unacked_seq("a") is None


def count_transactions(store: Store, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """From now on, count the write transactions begun on `store`; answers the count so far."""
    begun = 0
    real_transaction = store.transaction

    def counted() -> Any:
        nonlocal begun
        begun += 1
        return real_transaction()

    monkeypatch.setattr(store, "transaction", counted)
    return lambda: begun


async def test_enrollments_that_arrive_together_share_a_transaction_and_a_refusal_spends_nothing(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet, store = coordinator.fleet, coordinator.store
    tokens = [(await fleet.create_join_token(ADMIN, {"env": "staging"}, None))[0] for _ in range(6)]
    transactions = count_transactions(store, monkeypatch)
    asked = [
        (tokens[0], "web-1", {}),
        (tokens[1], "web-2", {}),
        (tokens[2], "web-3", {"env": "prod"}),  # a label its token does not give: refused
        (tokens[3], "web-4", {}),
        (tokens[0], "web-5", {}),  # a single-use token spent by web-1 just before: refused
        (tokens[4], "web-6", {}),
    ]
    results = await asyncio.gather(
        *(fleet.enroll(token, name, labels) for token, name, labels in asked),
        return_exceptions=True,
    )
    assert isinstance(results[2], PermissionDenied)
    assert isinstance(results[4], Unauthenticated)
    enrolled = {}
    for (_, name, _), answer in zip(asked, results, strict=True):
        if name in ("web-3", "web-5"):
            continue
        assert not isinstance(answer, BaseException)
        assert answer[0] == name
        enrolled[name] = answer[1]
    # The batch (failed by its refusals), then each alone, then a refusal's audit each.
    assert transactions() == 1 + len(asked) + 2
    for name, credential in enrolled.items():
        assert (await fleet.authenticate_agent(credential)).name == name
        stored = await store.get_agent(name)
        assert stored is not None
        assert stored.labels == {"env": "staging"}
    assert await store.get_agent("web-3") is None
    assert await store.get_agent("web-5") is None
    # The refused label did not spend web-3's token: it still enrolls with what it gives.
    name, credential = await fleet.enroll(tokens[2], "web-3", {})
    assert (await fleet.authenticate_agent(credential)).name == "web-3"
    chain = await store.audit_chain(0, 10_000)
    assert verify_chain(chain).ok
    kinds = [(e.kind, e.agent) for e in chain if e.kind.startswith("agent.enroll")]
    assert sorted(kinds) == sorted(
        [("agent.enrolled", n) for n in ["web-1", "web-2", "web-3", "web-4", "web-6"]]
        + [("agent.enroll_refused", "web-3"), ("agent.enroll_refused", "web-5")]
    )


async def test_a_burst_of_valid_enrollments_is_one_transaction(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet, store = coordinator.fleet, coordinator.store
    join, _ = await fleet.create_join_token(ADMIN, {"env": "staging"}, None, max_uses=None)
    transactions = count_transactions(store, monkeypatch)
    answers = await asyncio.gather(*(fleet.enroll(join, f"web-{i}", {}) for i in range(40)))
    assert transactions() == 1
    assert [name for name, _ in answers] == [f"web-{i}" for i in range(40)]
    assert len({credential for _, credential in answers}) == 40
    assert len(await store.list_agents()) == 40


@pytest.mark.parametrize("skip", [True, False])
async def test_an_abandoned_item_is_written_only_when_asked_to_keep_it(skip: bool) -> None:
    recorder = Recorder()
    recorder.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(recorder.write, skip_abandoned=skip)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.wait_for(recorder.started.wait(), 5)
    # Queued behind the batch being written; the second's caller leaves before its batch.
    waiting = [group.enqueue(i) for i in (1, 2, 3)]
    waiting[1].cancel()
    recorder.gate.set()
    assert await first == 0
    assert await waiting[0] == 10
    assert await waiting[2] == 30
    assert waiting[1].cancelled()
    assert recorder.batches == ([[0], [1, 3]] if skip else [[0], [1, 2, 3]])


async def test_an_enrollment_whose_caller_left_before_its_batch_is_not_written(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet, store = coordinator.fleet, coordinator.store
    tokens = [(await fleet.create_join_token(ADMIN, {"env": "staging"}, None))[0] for _ in range(3)]
    real_transaction = store.transaction
    gate, holding = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def held() -> AsyncIterator[Any]:
        # The first batch's transaction waits at the gate: the others queue behind it.
        async with real_transaction() as tx:
            holding.set()
            await asyncio.wait_for(gate.wait(), 5)
            yield tx

    monkeypatch.setattr(store, "transaction", held)
    first = asyncio.ensure_future(fleet.enroll(tokens[0], "web-1", {}))
    await asyncio.wait_for(holding.wait(), 5)
    monkeypatch.setattr(store, "transaction", real_transaction)
    left = asyncio.ensure_future(fleet.enroll(tokens[1], "web-2", {}))
    stays = asyncio.ensure_future(fleet.enroll(tokens[2], "web-3", {}))
    # One loop turn runs both up to their wait for the batch (nothing else awaits before it).
    await asyncio.sleep(0)
    left.cancel()  # its RPC's deadline passed while it waited
    gate.set()
    assert (await first)[0] == "web-1"
    assert (await stays)[0] == "web-3"
    assert left.cancelled()
    assert await store.get_agent("web-2") is None
    # Its token was not spent: the agent's next attempt enrolls.
    assert (await fleet.enroll(tokens[1], "web-2", {}))[0] == "web-2"
    kinds = [(e.kind, e.agent) for e in await store.audit_chain(0, 10_000)]
    assert kinds.count(("agent.enrolled", "web-2")) == 1


async def test_handshakes_that_arrive_together_read_their_credentials_at_once(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 agents authenticating at the same moment (a restart, a failover) read their
    credentials in one statement, not 40; a wrong credential among them is refused on its own.
    (The Hello's agent and unacknowledged-seq reads are batched the same way.)"""
    fleet, store = coordinator.fleet, coordinator.store
    join, _ = await fleet.create_join_token(ADMIN, {"env": "staging"}, None, max_uses=None)
    enrolled = await asyncio.gather(*(fleet.enroll(join, f"web-{i}", {}) for i in range(40)))
    calls: dict[str, int] = {"agents_for_credentials": 0}
    for method in calls:
        real = getattr(store, method)

        async def counted(keys: Sequence[str], real: Any = real, method: str = method) -> Any:
            calls[method] += 1
            return await real(keys)

        monkeypatch.setattr(store, method, counted)
    answers = await asyncio.gather(
        *(fleet.authenticate_agent(credential) for _, credential in enrolled),
        fleet.authenticate_agent("not-a-credential"),
        return_exceptions=True,
    )
    assert [a.name for a in answers[:40]] == [name for name, _ in enrolled]  # type: ignore[union-attr]
    assert isinstance(answers[40], Unauthenticated)
    assert calls["agents_for_credentials"] == 1


async def test_requests_arriving_together_read_their_agents_and_locks_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read of agents and locks for the requests that asked together, and each still
    judged by its own: the locked one refused, the unknown agent not found, the rest made."""
    lock, _, _ = await env.admin.create_lock(agent="db-1", action="deploy", reason="INC-9")
    store, access = env.coordinator.store, env.coordinator.access
    assert access is not None
    reads: list[list[str]] = []
    read = store.agents_and_locks

    async def counted(names: Sequence[str], now: Any) -> Any:
        reads.append(sorted(names))
        return await read(names, now)

    monkeypatch.setattr(store, "agents_and_locks", counted)
    alice = Principal("alice", frozenset({"developers"}))
    agents = ["web-1", "db-1", "web-1", "nobody", "web-1"]
    calls = [
        access.create_request(alice, agent=agent, action="deploy", duration=M15, reason="r")
        for agent in agents
    ]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert reads == [["db-1", "nobody", "web-1"]]
    assert isinstance(answers[1], Locked)
    assert lock.id in str(answers[1])
    assert isinstance(answers[3], NotFound)
    for k in (0, 2, 4):
        request, grant = answers[k]  # type: ignore[misc]
        assert request.state is RequestState.APPROVED
        assert grant is not None
    # The next request reads again (nothing is kept from one read to the next).
    await env.admin.lift_lock(lock.id, reason="over")
    request, _ = await access.create_request(
        alice, agent="db-1", action="deploy", duration=M15, reason="r"
    )
    assert request.state is RequestState.PENDING
    assert len(reads) == 2
