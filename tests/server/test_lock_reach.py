"""Lock commands reach every agent in the right order (server/domain/locks.py), against the real
coordinator (real gRPC, real SQLite), with raw agent streams to see each agent's log:

- a lifted whole-fleet lock's UNLOCK comes before any command written after the lift (a grant
  approved at once must not reach an agent still keeping the lock: it would refuse it);
- a lock still being handed out is enforced by the coordinator for the agents not reached yet;
- an agent enrolled after a lock, or a 0.1 agent upgraded, gets the locks in force;
- a 0.2 agent rolled back to 0.1 with a lock applied but not acknowledged is told truthfully;
- no break-glass code is issued under a lock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jitmesh import ConflictError, GrantState
from jitmesh.v1 import agentlink_pb2
from server.domain.models import ADMIN_GROUP, Principal
from tests.server.helpers import Env, agent_link, raw_sql

M15 = timedelta(minutes=15)
ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))


async def _not_yet(lock_id: str) -> None:
    """A handout that has not reached anyone yet (the coordinator between the lock's own
    transaction and its first step)."""


async def kinds(env: Env, agent: str) -> list[tuple[int, str]]:
    return [
        (c.seq, c.kind.value) for c in await env.coordinator.store.commands_after(agent, 0, 100)
    ]


def hello(agent: str, last_applied_seq: int, version: str) -> agentlink_pb2.AgentMessage:
    return agentlink_pb2.AgentMessage(
        hello=agentlink_pb2.Hello(
            agent=agent, last_applied_seq=last_applied_seq, version=version, boot_id="b2"
        )
    )


async def test_a_grant_approved_right_after_a_lift_comes_after_the_unlock(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
        assert (await link.command())[0] == 1
        await link.ack(1, "")
        # The lift commits; what is handed out in steps afterwards has not reached web-1 yet.
        monkeypatch.setattr(env.coordinator.locks, "hand_out", _not_yet)
        await env.admin.lift_lock(lock.id, reason="laptop found")
        request, grant = await env.alice.create_request(
            agent="web-1", action="deploy", duration=M15
        )
        assert grant is not None
        # The agent forgets the lock first, so it takes the grant.
        seq, body = await link.command()
        assert (seq, body.WhichOneof("kind"), body.unlock.lock_id) == (2, "unlock", lock.id)
        await link.ack(2, "")
        seq, body = await link.command()
        assert (seq, body.grant.grant_id) == (3, grant.id)
        await link.ack(3, grant.id)
        await env.wait_grant_state(request.id, GrantState.ACTIVE)
    assert await kinds(env, "db-1") == [(1, "lock"), (2, "unlock")]
    # Nothing is left to hand out: no second unlock.
    monkeypatch.undo()
    assert env.coordinator.locks is not None
    await env.coordinator.locks.finish_handouts()
    assert await kinds(env, "web-1") == [(1, "lock"), (2, "unlock"), (3, "grant")]


async def test_a_lock_not_handed_out_yet_is_enforced_by_the_coordinator(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env.coordinator.locks, "hand_out", _not_yet)
    lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
    assert await kinds(env, "web-1") == []
    # The approving transaction reads the lock row: no grant for an agent not reached yet.
    with pytest.raises(ConflictError, match=f"locked \\({lock.id}\\)"):
        await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert await kinds(env, "web-1") == []


async def test_an_agent_enrolled_after_a_lock_gets_it(env: Env) -> None:
    lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
    agent_lock, _, _ = await env.admin.create_lock(agent="web-2", reason="INC-10")
    await env.admin.create_lock(agent="db-1", reason="not web-2's")
    fleet = env.coordinator.fleet
    join, _ = await fleet.create_join_token(ADMIN, {"env": "staging"}, None)
    _, credential = await fleet.enroll(join, "web-2", {})
    assert await kinds(env, "web-2") == [(1, "lock"), (2, "lock")]
    async with agent_link(env.address, credential) as link:
        # A new agent says it applied nothing while its log holds commands: a snapshot, with
        # the locks in force for it.
        await link.hello("web-2")
        seq, body = await link.command()
    assert (seq, body.WhichOneof("kind"), body.snapshot.locks_complete) == (3, "snapshot", True)
    assert sorted(k.lock_id for k in body.snapshot.locks) == sorted([lock.id, agent_lock.id])


async def test_a_0_1_agent_upgraded_gets_the_locks_in_force(env: Env) -> None:
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.send(hello("web-1", 0, "0.1.0"))
        await link.next("welcome")
    lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
    assert await kinds(env, "web-1") == []  # a 0.1 agent keeps no locks
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1", 0)
        seq, body = await link.command()
        assert (seq, body.WhichOneof("kind"), body.lock.lock_id) == (1, "lock", lock.id)
        await link.ack(1, "")
    # Once: the next Hello of the same version adds nothing.
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1", 1)
    assert await kinds(env, "web-1") == [(1, "lock")]


async def test_a_lock_applied_before_a_rollback_is_not_called_unsent(env: Env) -> None:
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
        assert (await link.command())[0] == 1
        # Applied; the agent crashes before its ack, and comes back as 0.1.
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.send(hello("web-1", 1, "0.1.0"))
        assert (await link.next("welcome")).welcome.resume_after_seq == 1
    data = env.coordinator.config.data_dir / "coordinator.db"
    ((status, why),) = raw_sql(
        data, "SELECT ack_status, ack_reason FROM commands WHERE agent = 'web-1' AND seq = 1"
    )
    assert status == "NOT_APPLIED"
    assert why.startswith("not acknowledged: applied by the agent up to seq 1")
    assert "agent now 0.1.0 keeps no locks" in why
    assert await env.admin.list_audit(kind="lock.not_sent") == []
    (event,) = await env.admin.list_audit(kind="lock.not_acknowledged")
    assert (event.agent, event.details["lock"], event.details["seq"]) == ("web-1", lock.id, "1")
    assert (await env.admin.verify_audit()).ok


async def test_no_break_glass_code_is_issued_under_a_lock(env: Env) -> None:
    lock, _, _ = await env.admin.create_lock(subject="alice", reason="INC-9")
    with pytest.raises(ConflictError, match=f"locked \\({lock.id}\\): INC-9"):
        await env.admin.issue_breakglass_codes(
            "web-1", "deploy", "alice", M15, valid_for=timedelta(hours=1)
        )
    assert await env.admin.list_breakglass_codes() == []
    (refused,) = await env.admin.list_audit(kind="breakglass.issue_refused")
    assert (refused.actor, refused.subject, refused.agent, refused.details) == (
        "admin",
        "alice",
        "web-1",
        {"action": "deploy", "why": f"locked by {lock.id}"},
    )
    # Others are not stopped by it.
    codes = await env.admin.issue_breakglass_codes(
        "web-1", "deploy", "bob", M15, valid_for=timedelta(hours=1)
    )
    assert len(codes) == 1
