"""The store contract, run on every store through the `Store` interface only: requests,
compare-and-set, the command log, join tokens, tokens and users, policy versions, the audit
chain, and all-or-nothing transactions."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from functools import partial

import pytest

from jitmesh.types import GrantState, RequestState
from server.domain.audit import GENESIS, verify_chain
from server.domain.errors import Conflict, InvalidArgument
from server.domain.models import (
    AuditEntry,
    AuditKind,
    CommandKind,
    GrantChange,
    JoinToken,
    Moved,
    ObservedKind,
)
from server.domain.ports import Store
from tests.server.helpers import T0, make_grant, make_request
from tests.store.conftest import Opener


async def enroll(store: Store, *names: str) -> None:
    async with store.transaction() as tx:
        for name in names:
            assert await tx.enroll_agent(name, {"env": "staging"}, f"hash-{name}", T0)


async def grant_for(store: Store, agent: str = "web-1") -> str:
    request = make_request(agent=agent)
    grant = make_grant(request_id=request.id, agent=agent)
    async with store.transaction() as tx:
        await tx.insert_request(request)
        await tx.insert_grant(grant)
    return grant.id


async def audit_count(store: Store) -> int:
    return len(await store.audit_chain(0, 100_000))


# Migrations.


# Requests.


async def test_request_insert_get_round_trip(store: Store) -> None:
    request = make_request()
    async with store.transaction() as tx:
        await tx.insert_request(request)
        assert await tx.get_request(request.id) == request
    assert await store.get_request(request.id) == request
    assert await store.get_request("req-" + "0" * 32) is None


async def test_list_requests_pages_newest_first(store: Store) -> None:
    made = []
    async with store.transaction() as tx:
        for i in range(7):
            # Two requests share each instant, so the page token has to break ties by id.
            request = make_request(created_at=T0 + timedelta(seconds=i // 2))
            await tx.insert_request(request)
            made.append(request)
    expected = sorted(made, key=lambda r: (r.created_at, r.id), reverse=True)
    seen = []
    token = ""
    pages = 0
    while True:
        page, token = await store.list_requests(
            states=[], subject="", agent="", limit=3, page_token=token
        )
        seen.extend(page)
        pages += 1
        if not token:
            break
    assert pages == 3
    assert [r.id for r in seen] == [r.id for r in expected]


async def test_list_requests_filters(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.insert_request(make_request(subject="alice", agent="web-1"))
        await tx.insert_request(make_request(subject="bob", agent="web-1"))
        await tx.insert_request(
            make_request(subject="alice", agent="db-1", state=RequestState.DENIED)
        )

    async def ids(**filters: object) -> list[tuple[str, str, RequestState]]:
        args: dict[str, object] = {"states": [], "subject": "", "agent": "", **filters}
        page, token = await store.list_requests(limit=100, page_token="", **args)  # type: ignore[arg-type]
        assert token == ""
        return sorted((r.subject, r.agent, r.state) for r in page)

    assert await ids(subject="alice") == [
        ("alice", "db-1", RequestState.DENIED),
        ("alice", "web-1", RequestState.PENDING),
    ]
    assert [a for _, a, _ in await ids(agent="web-1")] == ["web-1", "web-1"]
    assert await ids(states=[RequestState.DENIED]) == [("alice", "db-1", RequestState.DENIED)]
    assert len(await ids(states=[RequestState.PENDING, RequestState.DENIED])) == 3


async def test_bad_page_token_is_invalid_argument(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        await store.list_requests(states=[], subject="", agent="", limit=5, page_token="x:y")


async def test_decide_request_is_compare_and_set(store: Store) -> None:
    request = make_request()
    async with store.transaction() as tx:
        await tx.insert_request(request)
    async with store.transaction() as tx:
        assert await tx.decide_request(
            request.id,
            expected=RequestState.PENDING,
            state=RequestState.DENIED,
            at=T0,
            by="bob",
            reason="no",
        )
    async with store.transaction() as tx:
        # The approval that lost the race changes nothing.
        assert not await tx.decide_request(
            request.id,
            expected=RequestState.PENDING,
            state=RequestState.APPROVED,
            at=T0,
            by="carol",
            reason="",
            grant_id="grt-1",
        )
    stored = await store.get_request(request.id)
    assert stored is not None
    assert stored.state is RequestState.DENIED
    assert stored.decided_by == "bob"
    assert stored.grant_id == ""


async def test_decide_request_refuses_steps_outside_the_lifecycle(store: Store) -> None:
    request = make_request()
    async with store.transaction() as tx:
        await tx.insert_request(request)
    with pytest.raises(ValueError, match="lifecycle"):
        async with store.transaction() as tx:
            await tx.decide_request(
                request.id,
                expected=RequestState.DENIED,
                state=RequestState.APPROVED,
                at=T0,
                by="x",
                reason="",
            )


async def test_move_grant_is_compare_and_set(store: Store) -> None:
    await enroll(store, "web-1")
    grant_id = await grant_for(store)
    async with store.transaction() as tx:
        assert not await tx.move_grant(
            grant_id, expected=[GrantState.ACTIVE], state=GrantState.REVOKING
        )
        assert await tx.move_grant(
            grant_id,
            expected=[GrantState.PENDING_DELIVERY],
            state=GrantState.ACTIVE,
            change=GrantChange(applied_at=T0 + timedelta(seconds=1)),
        )
        assert not await tx.move_grant(
            grant_id, expected=[GrantState.PENDING_DELIVERY], state=GrantState.ACTIVE
        )
    grant = await store.get_grant(grant_id)
    assert grant is not None
    assert grant.state is GrantState.ACTIVE
    assert grant.applied_at == T0 + timedelta(seconds=1)


async def test_move_grant_refuses_steps_outside_the_lifecycle(store: Store) -> None:
    grant_id = await grant_for(store)
    with pytest.raises(ValueError, match="lifecycle"):
        async with store.transaction() as tx:
            await tx.move_grant(grant_id, expected=[GrantState.EXPIRED], state=GrantState.ACTIVE)
    grant = await store.get_grant(grant_id)
    assert grant is not None
    assert grant.state is GrantState.PENDING_DELIVERY
    assert grant.subject == "alice"


# The command log.


async def test_append_command_numbers_each_agent_without_gaps(store: Store) -> None:
    await enroll(store, "web-1", "db-1")
    web = await grant_for(store, "web-1")
    db = await grant_for(store, "db-1")
    got: dict[str, list[int]] = {"web-1": [], "db-1": []}
    async with store.transaction() as tx:
        for agent, grant_id in [("web-1", web), ("db-1", db), ("web-1", web), ("web-1", web)]:
            got[agent].append(await tx.append_command(agent, CommandKind.GRANT, grant_id, T0))
    async with store.transaction() as tx:
        got["db-1"].append(await tx.append_command("db-1", CommandKind.REVOKE, db, T0, "revoked"))
    assert got == {"web-1": [1, 2, 3], "db-1": [1, 2]}
    commands = await store.commands_after("db-1", 0, 10)
    assert [(c.seq, c.kind, c.grant_id) for c in commands] == [
        (1, CommandKind.GRANT, db),
        (2, CommandKind.REVOKE, db),
    ]
    assert commands[1].revoke_reason == "revoked"
    assert [c.seq for c in await store.commands_after("web-1", 1, 10)] == [2, 3]
    db_agent = await store.get_agent("db-1")
    assert db_agent is not None
    assert db_agent.last_seq == 2
    grant = await store.get_grant(db)
    assert grant is not None
    assert (grant.grant_seq, grant.revoke_seq) == (1, 2)


async def test_append_command_under_concurrent_transactions(store: Store) -> None:
    await enroll(store, "web-1", "db-1")
    grants = {a: await grant_for(store, a) for a in ("web-1", "db-1")}

    async def append(agent: str, fail: bool) -> int:
        async with store.transaction() as tx:
            seq = await tx.append_command(agent, CommandKind.GRANT, grants[agent], T0)
            if fail:
                raise RuntimeError("rolled back")
            return seq

    jobs = [append(agent, fail=i % 5 == 4) for i in range(30) for agent in ("web-1", "db-1")]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    committed = [r for r in results if isinstance(r, int)]
    assert len(committed) == 48
    for agent in ("web-1", "db-1"):
        seqs = [c.seq for c in await store.commands_after(agent, 0, 1000)]
        assert seqs == list(range(1, 25))  # rolled-back numbers are reused: no gaps


async def test_append_command_for_unknown_agent(store: Store) -> None:
    grant_id = await grant_for(store)
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.append_command("ghost", CommandKind.GRANT, grant_id, T0)


async def test_ack_command_only_once(store: Store) -> None:
    await enroll(store, "web-1")
    grant_id = await grant_for(store)
    async with store.transaction() as tx:
        seq = await tx.append_command("web-1", CommandKind.GRANT, grant_id, T0)
    assert await store.first_unacked_seq("web-1") == seq
    async with store.transaction() as tx:
        first = await tx.ack_commands(
            [
                ("web-1", seq, "APPLIED", ""),
                ("web-1", seq, "APPLIED", ""),  # the same ack twice in one batch
                ("db-1", seq, "APPLIED", ""),  # another agent's
                ("web-1", 99, "APPLIED", ""),  # a command that does not exist
            ],
            T0,
        )
        again = await tx.ack_commands([("web-1", seq, "FAILED", "late")], T0)
    assert first == {("web-1", seq): (CommandKind.GRANT, grant_id, T0)}
    assert again == {}
    assert await store.first_unacked_seq("web-1") is None
    agent = await store.get_agent("web-1")
    assert agent is not None
    assert agent.last_acked_seq == seq  # an ack for a command that does not exist moves nothing


async def test_a_refused_grant_command_is_not_sent_again(store: Store) -> None:
    await enroll(store, "web-1")
    grants = [await grant_for(store) for _ in range(4)]
    async with store.transaction() as tx:
        for grant_id in grants:
            await tx.append_command("web-1", CommandKind.GRANT, grant_id, T0)
        await tx.append_command("web-1", CommandKind.REVOKE, grants[0], T0, "revoked")
        acks = [(1, "APPLIED"), (2, "FAILED"), (3, "REJECTED"), (5, "FAILED")]
        await tx.ack_commands([("web-1", seq, status, "") for seq, status in acks], T0)
    # Applied, unacknowledged and revoke commands are replayed; refused grants never again.
    assert [c.seq for c in await store.commands_after("web-1", 0, 10)] == [1, 4, 5]


# Join tokens.


async def test_join_token_is_single_use(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.insert_join_token("h1", {"env": "prod"}, "admin", T0, T0 + timedelta(hours=1), 1)
    async with store.transaction() as tx:
        assert await tx.use_join_token("h1", T0) == JoinToken({"env": "prod"})
    async with store.transaction() as tx:
        assert await tx.use_join_token("h1", T0) is None
        assert await tx.use_join_token("unknown", T0) is None


async def test_two_concurrent_uses_of_a_join_token_one_wins(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.insert_join_token("h1", {}, "admin", T0, T0 + timedelta(hours=1), 1)

    async def use() -> JoinToken | None:
        async with store.transaction() as tx:
            return await tx.use_join_token("h1", T0)

    results = await asyncio.gather(*(use() for _ in range(5)))
    assert sum(r is not None for r in results) == 1


async def test_join_token_expires(store: Store) -> None:
    expires = T0 + timedelta(minutes=10)
    async with store.transaction() as tx:
        await tx.insert_join_token("h1", {}, "admin", T0, expires, 5)
        assert await tx.use_join_token("h1", expires) is None
        assert await tx.use_join_token("h1", expires - timedelta(milliseconds=1)) == JoinToken({})


async def test_reusable_join_token(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.insert_join_token("dev", {}, "admin", T0, None, None)
    for _ in range(3):
        async with store.transaction() as tx:
            used = await tx.use_join_token("dev", T0 + timedelta(days=400))
            assert used == JoinToken({}, reusable=True)


async def test_a_replacement_join_token_names_its_agent(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.insert_join_token("h1", {}, "admin", T0, T0 + timedelta(hours=1), 1, "web-1")
        assert await tx.use_join_token("h1", T0) == JoinToken({}, replaces="web-1")


# Audit.


async def test_audit_chain_continues_across_reopen(store: Store, reopen: Opener) -> None:
    async with store.transaction() as tx:
        for i in range(3):
            await tx.audit(
                AuditEntry(ObservedKind("test.event"), "alice", T0, details={"i": str(i)})
            )
    head = await store.audit_head()
    await store.close()

    again = await reopen()
    assert await again.audit_head() == head
    async with again.transaction() as tx:
        event = await tx.audit(
            AuditEntry(ObservedKind("test.event"), "bob", T0 + timedelta(seconds=1))
        )
    assert event is not None
    assert (event.seq, event.prev_hash) == (4, head[1])
    events = await again.audit_chain(0, 100)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[0].prev_hash == GENESIS
    result = verify_chain(events)
    assert result.ok
    assert result.head_hash == (await again.audit_head())[1]


async def test_agent_event_with_the_same_id_is_stored_once(store: Store) -> None:
    entry = AuditEntry(
        ObservedKind("agent.grant.expired"), "agent:web-1", T0, agent="web-1", id="evt-agent-1"
    )
    async with store.transaction() as tx:
        first = await tx.audit(entry)
        in_same_tx = await tx.audit(entry)
    async with store.transaction() as tx:
        later = await tx.audit(entry)
    assert first is not None
    assert in_same_tx is None
    assert later is None
    assert [e.id for e in await store.audit_chain(0, 100)] == ["evt-agent-1"]
    assert await store.audit_head() == (1, first.hash)


async def test_list_audit_filters(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.audit(AuditEntry(ObservedKind("a"), "x", T0, agent="web-1", subject="alice"))
        await tx.audit(AuditEntry(ObservedKind("b"), "x", T0 + timedelta(seconds=5), agent="db-1"))
        await tx.audit(AuditEntry(ObservedKind("a"), "x", T0 + timedelta(seconds=9), subject="bob"))

    async def seqs(**filters: object) -> list[int]:
        args: dict[str, object] = {
            "since": None,
            "agent": "",
            "subject": "",
            "kind": "",
            "grant_id": "",
            "request_id": "",
            "after_seq": 0,
            "limit": 100,
            **filters,
        }
        return [e.seq for e in await store.list_audit(**args)]  # type: ignore[arg-type]

    assert await seqs() == [1, 2, 3]
    assert await seqs(agent="web-1") == [1]
    assert await seqs(subject="bob") == [3]
    assert await seqs(kind="a") == [1, 3]
    assert await seqs(after_seq=1) == [2, 3]
    assert await seqs(since=T0 + timedelta(seconds=5)) == [2, 3]
    assert await seqs(limit=2) == [1, 2]


# All or nothing.


async def test_a_transaction_that_raises_leaves_nothing_behind(store: Store) -> None:
    await enroll(store, "web-1")
    async with store.transaction() as tx:
        await tx.audit(AuditEntry(ObservedKind("before"), "x", T0))
    head = await store.audit_head()
    request = make_request()
    grant = make_grant(request_id=request.id)

    async def write_then_fail() -> None:
        async with store.transaction() as tx:
            await tx.insert_request(request)
            await tx.insert_grant(grant)
            await tx.append_command("web-1", CommandKind.GRANT, grant.id, T0)
            await tx.insert_join_token("h", {}, "admin", T0, None, 1)
            await tx.audit(
                AuditEntry(AuditKind.REQUEST_CREATED, "alice", T0, request_id=request.id)
            )
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await write_then_fail()
    assert await store.audit_head() == head
    assert await store.get_request(request.id) is None
    assert await store.get_grant(grant.id) is None
    assert await store.commands_after("web-1", 0, 10) == []
    agent = await store.get_agent("web-1")
    assert agent is not None
    assert agent.last_seq == 0
    assert await audit_count(store) == 1
    async with store.transaction() as tx:
        assert await tx.use_join_token("h", T0) is None
        # The next event continues from the committed head, not the rolled-back one.
        event = await tx.audit(AuditEntry(ObservedKind("after"), "x", T0))
    assert event is not None
    assert (event.seq, event.prev_hash) == (2, head[1])
    assert verify_chain(await store.audit_chain(0, 10)).ok


async def test_a_cancelled_transaction_leaves_nothing_behind(store: Store) -> None:
    started = asyncio.Event()
    never = asyncio.Event()
    request = make_request()

    async def write() -> None:
        async with store.transaction() as tx:
            await tx.insert_request(request)
            await tx.audit(AuditEntry(AuditKind.REQUEST_CREATED, "alice", T0))
            started.set()
            await never.wait()

    task = asyncio.create_task(write())
    async with asyncio.timeout(10):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.audit_head() == (0, GENESIS)
    assert await store.get_request(request.id) is None
    assert await audit_count(store) == 0
    async with store.transaction() as tx:  # the writer is usable again
        await tx.audit(AuditEntry(ObservedKind("after"), "x", T0))
    assert (await store.audit_head())[0] == 1


async def test_tokens_and_users(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        assert await tx.insert_token("th", "alice", T0, T0 + timedelta(hours=1), "ci")
        assert not await tx.insert_token("th", "alice", T0, None, "again")
        await tx.upsert_user("alice", ["developers", "sre"], T0)
    principal = await store.principal_for_token("th", T0)
    assert principal is not None
    assert principal.name == "alice"
    assert principal.groups == frozenset({"developers", "sre"})
    assert await store.principal_for_token("th", T0 + timedelta(hours=1)) is None
    assert await store.principal_for_token("other", T0) is None
    assert await store.user_groups("alice") == frozenset({"developers", "sre"})
    assert await store.user_groups("nobody") is None
    assert principal.scopes == frozenset()


async def test_token_refusal_says_why(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("alice", ["developers"], T0)
        await tx.upsert_user("bob", ["sre"], T0)
        assert await tx.insert_token("ta", "alice", T0, T0 + timedelta(hours=1), "")
        assert await tx.insert_token("tr", "bob", T0, None, "")
        assert await tx.set_user_disabled("alice", True)
        assert await tx.revoke_token("tr", T0)  # ids are hash prefixes: here the whole hash
    assert await store.token_refusal("ta", T0) == ("disabled", "alice")
    assert await store.token_refusal("tr", T0) == ("revoked", "bob")
    assert await store.token_refusal("nothing", T0) == ("unknown", "")
    async with store.transaction() as tx:
        assert await tx.set_user_disabled("alice", False)
    assert await store.token_refusal("ta", T0 + timedelta(hours=1)) == ("expired", "alice")
    assert await store.token_refusal("ta", T0) == ("unknown", "")  # not refused at all


async def test_scoped_tokens(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.upsert_user("slack-bridge", ["bridges"], T0)
        scopes = ["review-on-behalf", "review-on-behalf"]
        assert await tx.insert_token("bh", "slack-bridge", T0, None, "slack", scopes)
    principal = await store.principal_for_token("bh", T0)
    assert principal is not None
    assert principal.scopes == frozenset({"review-on-behalf"})
    [info] = await store.list_tokens("slack-bridge")
    assert info.scopes == ("review-on-behalf",)


async def test_removed_agent_loses_its_credential(store: Store) -> None:
    await enroll(store, "web-1")
    assert await store.agent_for_credential("hash-web-1") == "web-1"
    async with store.transaction() as tx:
        assert await tx.remove_agent("web-1", T0)
        assert not await tx.remove_agent("web-1", T0)
    assert await store.agent_for_credential("hash-web-1") is None
    assert await store.get_agent("web-1") is None
    async with store.transaction() as tx:
        # Enrolling again revives the name with a new credential.
        assert not await tx.enroll_agent("web-1", {}, "hash-new", T0)
    assert await store.agent_for_credential("hash-new") == "web-1"


async def test_policies_are_versioned(store: Store) -> None:
    assert await store.current_policy() is None
    async with store.transaction() as tx:
        assert await tx.insert_policy("a: 1\n", "sha-a", T0, "admin") == 1
        assert await tx.insert_policy("b: 2\n", "sha-b", T0, "admin") == 2
    current = await store.current_policy()
    assert current is not None
    assert (current.version, current.yaml) == (2, "b: 2\n")


async def test_next_deadline_and_due_rows(store: Store) -> None:
    await enroll(store, "web-1")
    assert await store.next_deadline() is None
    request = make_request(created_at=T0)  # pending until T0 + 1h
    grant = make_grant(request_id="req-x", duration=timedelta(minutes=10))
    async with store.transaction() as tx:
        await tx.insert_request(request)
        await tx.insert_grant(grant)
    assert await store.next_deadline() == T0 + timedelta(minutes=10)
    early, due = T0 + timedelta(minutes=9), T0 + timedelta(minutes=10)
    async with store.transaction() as tx:
        assert await tx.move_due_grants(early, 10, state=GrantState.EXPIRED) == []
        expire = partial(
            tx.move_due_requests, state=RequestState.EXPIRED, by="coordinator", reason="late"
        )
        assert await expire(T0 + timedelta(minutes=59), 10) == []
        moved = await tx.move_due_grants(
            due, 10, state=GrantState.EXPIRED, change=GrantChange(ended_at=due)
        )
        assert moved == [Moved(grant.id, "req-x", "web-1", "alice", "deploy", "PENDING_DELIVERY")]
        # Moved once: a second sweep finds nothing (compare-and-set on the state).
        assert await tx.move_due_grants(due, 10, state=GrantState.EXPIRED) == []
        ended = await expire(T0 + timedelta(hours=1), 10)
        assert [(r.id, r.was) for r in ended] == [(request.id, "PENDING")]
        assert await expire(T0 + timedelta(hours=1), 10) == []
    stored = await store.get_grant(grant.id)
    assert stored is not None
    assert (stored.state, stored.ended_at) == (GrantState.EXPIRED, due)
    expired = await store.get_request(request.id)
    assert expired is not None
    assert (expired.state, expired.decided_by) == (RequestState.EXPIRED, "coordinator")
    assert await store.next_deadline() is None


async def test_move_due_grants_takes_only_due_grants_that_may_expire(store: Store) -> None:
    minute = timedelta(minutes=1)
    states = [GrantState.ACTIVE, GrantState.PENDING_DELIVERY, GrantState.REVOKING,
              GrantState.REVOKE_FAILED, GrantState.REVOKED, GrantState.FAILED]  # fmt: skip
    grants = [make_grant(request_id=f"req-{s.value}", state=s, duration=minute) for s in states]
    later = make_grant(request_id="req-later", state=GrantState.ACTIVE, duration=2 * minute)
    async with store.transaction() as tx:
        for grant in [*grants, later]:
            await tx.insert_grant(grant)
    with pytest.raises(ValueError, match="no step"):
        async with store.transaction() as tx:
            await tx.move_due_grants(T0 + minute, 10, state=GrantState.ACTIVE)
    async with store.transaction() as tx:
        # The limit spans the states: two now, the third in the next batch.
        first = await tx.move_due_grants(T0 + minute, 2, state=GrantState.EXPIRED)
        second = await tx.move_due_grants(T0 + minute, 2, state=GrantState.EXPIRED)
    assert [(m.was, m.request_id) for m in first + second] == [
        (s.value, f"req-{s.value}") for s in states[:3]
    ]
    for grant, state in zip(grants, states, strict=True):
        stored = await store.get_grant(grant.id)
        assert stored is not None
        assert stored.state is (GrantState.EXPIRED if state in states[:3] else state)
    stored = await store.get_grant(later.id)
    assert stored is not None
    assert stored.state is GrantState.ACTIVE


# Cancellation.


async def test_handshake_reads_for_many_agents_at_once_answer_as_one_by_one(
    store: Store,
) -> None:
    """The batched reads of handshakes that arrive together (credentials, agents, first
    unacknowledged seqs) say what the one-agent reads say, and leave out what those answer
    None: unknown and removed agents, agents with nothing unacknowledged."""
    for name in ("web-1", "web-2", "db-1"):
        await enroll(store, name)
    grant_id = await grant_for(store)
    async with store.transaction() as tx:
        first = await tx.append_command("web-1", CommandKind.GRANT, grant_id, T0)
        await tx.append_command("web-1", CommandKind.GRANT, grant_id, T0)
        acked = await tx.append_command("web-2", CommandKind.GRANT, grant_id, T0)
        await tx.ack_commands([("web-2", acked, "APPLIED", "")], T0)
        assert await tx.remove_agent("db-1", T0)
    hashes = ["hash-web-1", "hash-web-2", "hash-db-1", "hash-nobody"]
    assert await store.agents_for_credentials(hashes) == {
        "hash-web-1": "web-1",
        "hash-web-2": "web-2",
    }
    names = ["web-1", "web-2", "db-1", "nobody"]
    agents = await store.agents_named(names)
    assert sorted(agents) == ["web-1", "web-2"]
    for name, agent in agents.items():
        assert agent == await store.get_agent(name)
    assert await store.first_unacked_seqs(names) == {"web-1": first}
    assert await store.first_unacked_seq("web-1") == first
    assert await store.first_unacked_seqs([]) == {}
