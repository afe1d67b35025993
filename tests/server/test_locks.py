"""Locks, the emergency stop, against the real coordinator: a real gRPC server in the test's event
loop, the SDK as the caller, raw agent streams to see the revokes that reach the agents."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from jitmesh import (
    ConflictError,
    GrantState,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestState,
)
from jitmesh.types import Lock, LockTarget
from jitmesh.v1 import agentlink_pb2, locks_pb2, locks_pb2_grpc
from server.domain.models import new_id
from tests.server.helpers import T0, TOKENS, Env, agent_link, bearer, channel, raw_sql

M15 = timedelta(minutes=15)


async def auto_grant(env: Env, action: str = "deploy") -> tuple[str, str]:
    request, grant = await env.alice.create_request(agent="web-1", action=action, duration=M15)
    assert grant is not None
    return request.id, grant.id


async def test_lock_on_a_subject_revokes_their_grants_and_pushes_the_revokes(env: Env) -> None:
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        first_request, first = await auto_grant(env, "deploy")
        second_request, second = await auto_grant(env, "restart")
        assert [(await link.command())[0] for _ in range(2)] == [1, 2]
        await link.ack(1, first)
        await env.wait_grant_state(first_request, GrantState.ACTIVE)

        lock, revoked, denied = await env.admin.create_lock(subject="alice", reason="INC-7")
        assert (revoked, denied) == (2, 0)
        assert lock.target == LockTarget(subject="alice")
        assert (lock.created_by, lock.created_at, lock.reason) == ("admin", T0, "INC-7")
        assert lock.in_force(T0)

        # One revoke per grant, next in the agent's gap-free log, in grant order.
        commands = [await link.command() for _ in range(2)]
        assert [(seq, body.WhichOneof("kind")) for seq, body in commands] == [
            (3, "revoke"),
            (4, "revoke"),
        ]
        assert [body.revoke.grant_id for _, body in commands] == [first, second]
        for grant_id, seq in ((first, 3), (second, 4)):
            grant = await env.admin.get_grant(grant_id)
            assert (grant.state, grant.revoke_seq) == (GrantState.REVOKING, seq)
            assert grant.end_reason == f"locked: {lock.id}"
        await link.ack(3, first)
        request = await env.wait_grant_state(first_request, GrantState.REVOKED)
        assert request.grant_state is GrantState.REVOKED
    revoking = await env.admin.list_audit(kind="grant.revoking")
    assert sorted(e.grant_id for e in revoking) == sorted([first, second])
    assert {e.details["lock"] for e in revoking} == {lock.id}
    created = await env.admin.list_audit(kind="lock.created")
    assert [(e.actor, e.subject, e.details["lock"]) for e in created] == [
        ("admin", "alice", lock.id)
    ]
    assert (await env.admin.verify_audit()).ok
    _ = second_request


async def test_locked_subject_cannot_request_and_the_refusal_is_audited(env: Env) -> None:
    lock, _, _ = await env.admin.create_lock(subject="ALICE", action="deploy", reason="INC-8")
    assert lock.target == LockTarget(subject="alice", action="deploy")
    with pytest.raises(ConflictError, match=f"locked \\({lock.id}\\): INC-8"):
        await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    refused = await env.admin.list_audit(kind="request.refused")
    assert [(e.subject, e.details["why"]) for e in refused] == [("alice", f"locked by {lock.id}")]
    assert await env.admin.list_requests() == []
    # Other actions and other people are not locked.
    _, other = await auto_grant(env, "restart")
    assert other
    request, grant = await env.dave.create_request(agent="web-1", action="deploy", duration=M15)
    assert grant is not None
    assert request.state is RequestState.APPROVED


async def test_lock_denies_pending_requests_and_refuses_their_approval(env: Env) -> None:
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="release 42"
    )
    lock, revoked, denied = await env.admin.create_lock(agent="db-1", reason="host compromised")
    assert (revoked, denied) == (0, 1)
    denied_request = await env.alice.get_request(request.id)
    assert denied_request.state is RequestState.DENIED
    assert denied_request.decision_reason == f"locked: {lock.id}"
    with pytest.raises(ConflictError):
        await env.bob.approve(request.id)
    assert [e.request_id for e in await env.admin.list_audit(kind="request.denied")] == [request.id]


async def test_approval_inside_the_transaction_sees_a_lock(env: Env) -> None:
    """A lock committed between a request's creation and its approval (here written straight
    into the store, as a lock racing the approval would be) refuses the approval."""
    request, _ = await env.alice.create_request(
        agent="db-1", action="deploy", duration=M15, reason="release 42"
    )
    async with env.coordinator.store.transaction() as tx:
        await tx.insert_lock(Lock(new_id("lck"), LockTarget(agent="db-1"), "race", "admin", T0))
    with pytest.raises(ConflictError, match="locked"):
        await env.bob.approve(request.id)
    assert (await env.alice.get_request(request.id)).state is RequestState.PENDING
    assert await env.admin.list_grants() == []


async def test_lift_and_expiry_end_a_lock(env: Env) -> None:
    lifted, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
    timed, _, _ = await env.admin.create_lock(
        subject="dave", reason="INC-10", ttl=timedelta(minutes=5)
    )
    assert timed.expires_at == T0 + timedelta(minutes=5)
    assert {x.id for x in await env.admin.list_locks()} == {lifted.id, timed.id}
    ended = await env.admin.lift_lock(lifted.id, reason="resolved")
    assert (ended.lifted_at, ended.lifted_by, ended.lift_reason) == (T0, "admin", "resolved")
    assert not ended.in_force(T0)
    _, grant = await auto_grant(env)
    assert grant
    with pytest.raises(ConflictError, match="lifted already"):
        await env.admin.lift_lock(lifted.id)
    with pytest.raises(ConflictError):
        await env.dave.create_request(agent="web-1", action="deploy", duration=M15)
    await env.clock.advance(timedelta(minutes=5))
    request, _ = await env.dave.create_request(agent="web-1", action="deploy", duration=M15)
    assert request.state is RequestState.APPROVED
    assert await env.admin.list_locks() == []
    assert {x.id for x in await env.admin.list_locks(include_ended=True)} == {lifted.id, timed.id}
    assert [e.details["lift_reason"] for e in await env.admin.list_audit(kind="lock.lifted")] == [
        "resolved"
    ]


async def test_only_admins_lock(env: Env) -> None:
    _, grant = await auto_grant(env)
    with pytest.raises(PermissionDeniedError):
        await env.bob.create_lock(subject="alice", reason="not mine to do")
    assert (await env.admin.get_grant(grant)).state is GrantState.PENDING_DELIVERY
    lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-11")
    with pytest.raises(PermissionDeniedError):
        await env.bob.lift_lock(lock.id)
    assert (
        raw_sql(env.coordinator.config.data_dir / "coordinator.db", "SELECT COUNT(*) FROM locks")[
            0
        ][0]
        == 1
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs a subject, an agent or an action"),
        ({"subject": "alice", "reason": "  "}, "needs a reason"),
        ({"subject": "alice; rm -rf /"}, "subject"),
        ({"agent": "../etc"}, "agent"),
        ({"action": "DEPLOY"}, "action"),
        ({"subject": "alice", "ttl": timedelta(0)}, "ttl"),
    ],
)
async def test_bad_locks_are_refused_and_change_nothing(
    env: Env, fields: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"reason": "INC-12", **fields}
    with pytest.raises(InvalidArgumentError, match=message):
        await env.admin.create_lock(**args)  # type: ignore[arg-type]
    assert (
        raw_sql(env.coordinator.config.data_dir / "coordinator.db", "SELECT COUNT(*) FROM locks")[
            0
        ][0]
        == 0
    )


async def test_server_checks_lock_input_too(env: Env) -> None:
    """The SDK refuses bad input before sending; the server refuses it on its own as well."""
    async with channel(env.address) as ch:
        stub = locks_pb2_grpc.LocksStub(ch)
        for target in (
            locks_pb2.LockTarget(),
            locks_pb2.LockTarget(subject="a" * 500),
            locks_pb2.LockTarget(agent="web-1\x00"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateLock(
                    locks_pb2.CreateLockRequest(target=target, reason="x"),
                    metadata=bearer(TOKENS["admin"]),
                )
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (
        raw_sql(env.coordinator.config.data_dir / "coordinator.db", "SELECT COUNT(*) FROM locks")[
            0
        ][0]
        == 0
    )


async def test_unknown_lock(env: Env) -> None:
    with pytest.raises(NotFoundError):
        await env.admin.lift_lock(new_id("lck"))
    with pytest.raises(InvalidArgumentError):
        await env.admin.lift_lock("not-an-id")


async def test_grants_on_many_agents_are_revoked_in_one_lock(env: Env) -> None:
    """A lock on an action ends it on every agent; each agent's log stays gap-free."""
    for _ in range(3):
        await auto_grant(env, "restart")
    request, _ = await env.alice.create_request(
        agent="db-1", action="restart", duration=M15, reason="r"
    )
    await env.bob.approve(request.id)
    _, revoked, _ = await env.admin.create_lock(action="restart", reason="bad release")
    assert revoked == 4
    rows = raw_sql(
        env.coordinator.config.data_dir / "coordinator.db",
        "SELECT agent, seq, kind FROM commands ORDER BY agent, seq",
    )
    assert rows == [
        ("db-1", 1, "grant"),
        ("db-1", 2, "revoke"),
        # Every agent the lock concerns keeps it too (wire 0.2), after the revokes.
        ("db-1", 3, "lock"),
        ("web-1", 1, "grant"),
        ("web-1", 2, "grant"),
        ("web-1", 3, "grant"),
        ("web-1", 4, "revoke"),
        ("web-1", 5, "revoke"),
        ("web-1", 6, "revoke"),
        ("web-1", 7, "lock"),
    ]
    assert raw_sql(
        env.coordinator.config.data_dir / "coordinator.db",
        "SELECT last_seq FROM agents ORDER BY name",
    ) == [
        (3,),
        (7,),
    ]
    states = {g.state for g in await env.admin.list_grants()}
    assert states == {GrantState.REVOKING}


async def test_a_lock_committed_after_the_callers_check_refuses_the_request(env: Env) -> None:
    """The race the in-transaction check closes: the request passed its own lock check and
    waits for its group commit while a lock commits; it is refused, not granted, and no
    command (nor sequence number) is spent on it."""
    access = env.coordinator.access
    assert access is not None
    async with env.coordinator.store.transaction() as tx:
        creating = asyncio.create_task(
            env.alice.create_request(agent="web-1", action="deploy", duration=M15)
        )
        async with asyncio.timeout(10):
            while access.creations_waiting < 1:
                await asyncio.sleep(0.01)
        await tx.insert_lock(Lock(new_id("lck"), LockTarget(subject="alice"), "race", "admin", T0))
    with pytest.raises(ConflictError, match="locked"):
        await creating
    assert await env.admin.list_requests() == []
    assert (
        raw_sql(
            env.coordinator.config.data_dir / "coordinator.db", "SELECT COUNT(*) FROM commands"
        )[0][0]
        == 0
    )
    assert raw_sql(
        env.coordinator.config.data_dir / "coordinator.db",
        "SELECT last_seq FROM agents WHERE name = 'web-1'",
    ) == [(0,)]
    refused = await env.admin.list_audit(kind="request.refused")
    assert [e.details["why"] for e in refused] == [
        f"locked by {(await env.admin.list_locks())[0].id}"
    ]
    # The next request, unlocked, gets sequence number 1: no gap was left.
    _, grant = await env.dave.create_request(agent="web-1", action="deploy", duration=M15)
    assert grant is not None
    assert grant.grant_seq == 1


async def test_a_lock_command_a_previous_release_agent_cannot_read_is_settled_at_its_hello(
    env: Env,
) -> None:
    """web-1 ran this release when the lock was created, so its log got the lock command; it
    comes back as a 0.1 agent (rolled back), which cannot read one. The command is never sent
    (the lock's revoke is) and is settled at the Hello: marked NOT_APPLIED with why, audited,
    so that nothing waits on it: not the resume point, not the log's retention."""
    data = env.coordinator.config.data_dir / "coordinator.db"
    store = env.coordinator.store

    def hello(last_applied_seq: int, *active: str) -> agentlink_pb2.AgentMessage:
        return agentlink_pb2.AgentMessage(
            hello=agentlink_pb2.Hello(
                agent="web-1",
                last_applied_seq=last_applied_seq,
                active_grant_ids=active,
                version="0.1.0",
                boot_id="b2",
            )
        )

    async def retention() -> int:
        async with store.transaction() as tx:
            await tx.truncate_command_log(100)
        return await store.command_log_start("web-1")

    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        request, grant = await auto_grant(env)
        assert (await link.command())[0] == 1
        await link.ack(1, grant)
        await env.wait_grant_state(request, GrantState.ACTIVE)
    lock, revoked, _ = await env.admin.create_lock(subject="alice", reason="INC-7")
    assert revoked == 1
    assert raw_sql(data, "SELECT seq, kind FROM commands WHERE agent = 'web-1' AND seq > 1") == [
        (2, "revoke"),
        (3, "lock"),
    ]
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.send(hello(1, grant))
        assert (await link.next("welcome")).welcome.resume_after_seq == 1
        seq, body = await link.command()
        assert (seq, body.WhichOneof("kind"), body.revoke.grant_id) == (2, "revoke", grant)
        await link.ack(2, grant)
        await env.wait_grant_state(request, GrantState.REVOKED)
    why = "not sent: agent 0.1.0 keeps no locks (the lock's revokes are sent)"
    assert raw_sql(
        data, "SELECT ack_status, ack_reason FROM commands WHERE agent = 'web-1' AND seq = 3"
    ) == [("NOT_APPLIED", why)]
    assert await store.first_unacked_seq("web-1") is None
    # Told truthfully: not sent, to whom, which lock, and why.
    (event,) = await env.admin.list_audit(kind="lock.not_sent")
    assert (event.actor, event.agent, event.subject) == ("coordinator", "web-1", "alice")
    assert event.details == {
        "lock": lock.id,
        "command": "lock",
        "seq": "3",
        "version": "0.1.0",
        "why": why,
    }
    # The agent acknowledged up to 2: the log is kept from there (a reconnect resumes at 2,
    # no snapshot), and settled once (the next Hello finds nothing to settle).
    assert await retention() == 2
    await env.admin.lift_lock(lock.id, reason="laptop found")
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.send(hello(2))
        assert (await link.next("welcome")).welcome.resume_after_seq == 2
        # The next command (no unlock for a 0.1 agent) is acknowledged: retention passes the
        # lock command.
        request, grant = await auto_grant(env)
        seq, body = await link.command()
        assert (seq, body.grant.grant_id) == (4, grant)
        await link.ack(4, grant)
        await env.wait_grant_state(request, GrantState.ACTIVE)
    assert await retention() == 4
    assert raw_sql(data, "SELECT seq FROM commands WHERE agent = 'web-1'") == []
    assert len(await env.admin.list_audit(kind="lock.not_sent")) == 1
    assert (await env.admin.verify_audit()).ok
