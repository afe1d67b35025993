"""AgentLink at the wire: a raw gRPC stream driven as an agent would drive it, against the real
coordinator. Identity comes from the credential in the metadata, never from the Hello."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

import jitmesh
from jitmesh import GrantState, RequestState
from jitmesh.v1 import agentlink_pb2, types_pb2
from tests.server.helpers import T0, Env, agent_link

M15 = timedelta(minutes=15)


# A request for a pair the subject already holds live would reuse that grant: each call asks for
# another (subject, action) pair, so every call makes a new grant and command.
_PAIRS = [(who, action) for who in ("alice", "dave") for action in ("deploy", "restart", "logs")]


async def approved_prod_grant(env: Env) -> tuple[str, str]:
    held = {(g.subject, g.action) for g in await env.admin.list_grants() if not g.state.terminal}
    who, action = next(pair for pair in _PAIRS if pair not in held)
    request, _ = await env.clients[who].create_request(
        agent="db-1", action=action, duration=M15, reason="release 42"
    )
    request, grant = await env.bob.approve(request.id)
    assert grant is not None
    return request.id, grant.id


def event(event_id: str, kind: str, grant_id: str) -> agentlink_pb2.AgentMessage:
    observed = Timestamp()
    observed.FromDatetime(T0)
    return agentlink_pb2.AgentMessage(
        event=agentlink_pb2.AgentEvent(
            event_id=event_id,
            kind=kind,
            grant_id=grant_id,
            subject="alice",
            action="deploy",
            observed_at=observed,
            details={"how": "timer"},
        )
    )


async def test_hello_gets_welcome(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        welcome = await link.hello("db-1")
        assert welcome.epoch == env.coordinator.epoch
        assert welcome.resume_after_seq == 0
        assert welcome.agent == "db-1"
        assert welcome.coordinator_time.ToDatetime() == T0.replace(tzinfo=None)
        # The replica holding the stream names itself (stable: kept in DATA/replica.id).
        assert welcome.replica == env.coordinator.replica != ""
        agent = await env.admin.get_agent("db-1")
        assert agent.connected
        assert agent.version == jitmesh.__version__
    assert "agent.connected" in [e.kind for e in await env.admin.list_audit(agent="db-1")]


async def test_approval_is_pushed_and_applied(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        request_id, grant_id = await approved_prod_grant(env)
        seq, body = await link.command()
        assert seq == 1
        assert body.WhichOneof("kind") == "grant"
        assert (body.agent, body.seq, body.epoch) == ("db-1", 1, env.coordinator.epoch)
        # Inside the signed bytes: the agent's log names the replica that sent each command.
        assert body.replica == env.coordinator.replica != ""
        assert body.grant.grant_id == grant_id
        assert (body.grant.subject, body.grant.action) == ("alice", "deploy")
        assert body.grant.request_id == request_id
        assert body.grant.not_after.ToDatetime() == (T0 + M15).replace(tzinfo=None)
        assert body.grant.offline.mode == types_pb2.OFFLINE_MODE_HOLD

        await link.ack(seq, grant_id)
        request = await env.wait_grant_state(request_id, GrantState.ACTIVE)
        assert request.grant_state is GrantState.ACTIVE
        grant = await env.admin.get_grant(grant_id)
        assert grant.applied_at == T0
        assert (await env.admin.get_agent("db-1")).last_acked_seq == 1
        applied = await env.admin.list_audit(kind="grant.applied")
        assert [(e.grant_id, e.actor) for e in applied] == [(grant_id, "agent:db-1")]

        # The revoke follows on the same stream; its ack ends the grant as REVOKED.
        revoking = await env.admin.revoke_grant(grant_id)
        seq, body = await link.command()
        assert (seq, body.WhichOneof("kind")) == (revoking.revoke_seq, "revoke")
        assert body.revoke.grant_id == grant_id
        assert body.replica == env.coordinator.replica
        await link.ack(seq, grant_id)
        request = await env.wait_grant_state(request_id, GrantState.REVOKED)
        assert request.grant_state is GrantState.REVOKED


async def test_failed_apply_marks_the_grant_failed(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        request_id, grant_id = await approved_prod_grant(env)
        seq, _ = await link.command()
        await link.ack(seq, grant_id, agentlink_pb2.ACK_STATUS_FAILED)
        request = await env.wait_grant_state(request_id, GrantState.FAILED)
        assert request.grant_state is GrantState.FAILED
    assert (await env.admin.list_audit(kind="grant.apply_failed"))[0].grant_id == grant_id


async def test_reconnect_resends_from_the_last_applied_seq(env: Env) -> None:
    credential = env.credentials["db-1"]
    grants = []
    async with agent_link(env.address, credential) as link:
        await link.hello("db-1")
        for _ in range(3):
            request_id, grant_id = await approved_prod_grant(env)
            seq, body = await link.command()
            assert body.grant.grant_id == grant_id
            await link.ack(seq, grant_id)
            await env.wait_grant_state(request_id, GrantState.ACTIVE)
            grants.append(grant_id)

    # The agent lost what it applied after seq 1 (a restored disk): it says so, and gets the rest.
    async with agent_link(env.address, credential) as link:
        welcome = await link.hello("db-1", last_applied_seq=1)
        assert welcome.resume_after_seq == 1
        resent = [await link.command() for _ in range(2)]
        assert [(seq, body.grant.grant_id) for seq, body in resent] == [
            (2, grants[1]),
            (3, grants[2]),
        ]
        # Live commands continue after the replay, in order.
        _, grant_id = await approved_prod_grant(env)
        seq, body = await link.command()
        assert (seq, body.grant.grant_id) == (4, grant_id)


async def test_an_agent_behind_the_truncated_log_gets_a_snapshot(env: Env) -> None:
    credential = env.credentials["db-1"]
    grants = []
    async with agent_link(env.address, credential) as link:
        await link.hello("db-1")
        for _ in range(3):
            request_id, grant_id = await approved_prod_grant(env)
            seq, _ = await link.command()
            await link.ack(seq, grant_id)
            await env.wait_grant_state(request_id, GrantState.ACTIVE)
            grants.append(grant_id)
    retention = env.coordinator.retention
    assert retention is not None
    assert await retention.truncate() == 3
    # Caught up: nothing to resend, and no snapshot.
    async with agent_link(env.address, credential) as link:
        welcome = await link.hello("db-1", last_applied_seq=3)
        assert welcome.resume_after_seq == 3
    # It lost what it applied after seq 1 (a restored disk), and those commands are gone from
    # the log: a snapshot, under the next seq, holds the grants instead.
    async with agent_link(env.address, credential) as link:
        welcome = await link.hello("db-1", last_applied_seq=1)
        assert welcome.resume_after_seq == 4
        seq, body = await link.command()
        assert (seq, body.WhichOneof("kind")) == (4, "snapshot")
        assert sorted(g.grant_id for g in body.snapshot.grants) == sorted(grants)


async def test_unacknowledged_commands_are_resent(env: Env) -> None:
    credential = env.credentials["db-1"]
    async with agent_link(env.address, credential) as link:
        await link.hello("db-1")
        _, first = await approved_prod_grant(env)
        _, second = await approved_prod_grant(env)
        assert [(await link.command())[0] for _ in range(2)] == [1, 2]
        await link.ack(1, first)
        await env.wait_grant_state((await env.admin.get_grant(first)).request_id, GrantState.ACTIVE)
        # The ack for 2 is lost with the connection.
    async with agent_link(env.address, credential) as link:
        welcome = await link.hello("db-1", last_applied_seq=2)
        assert welcome.resume_after_seq == 1
        seq, body = await link.command()
        assert (seq, body.grant.grant_id) == (2, second)


async def test_agent_ahead_of_the_log_gets_a_snapshot(env: Env) -> None:
    _, grant_id = await approved_prod_grant(env)
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        welcome = await link.hello("db-1", last_applied_seq=50)
        # The snapshot has its own place in the log, after the grant command (seq 1).
        assert welcome.resume_after_seq == 2
        seq, body = await link.command()
        assert (seq, body.WhichOneof("kind")) == (2, "snapshot")
        assert [g.grant_id for g in body.snapshot.grants] == [grant_id]
        assert body.replica == env.coordinator.replica != ""


async def test_hello_naming_another_agent_is_refused(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(agentlink_pb2.AgentMessage(hello=agentlink_pb2.Hello(agent="web-1")))
        assert await link.ended() is grpc.StatusCode.PERMISSION_DENIED
    refused = await env.admin.list_audit(kind="agent.impersonation_refused")
    assert [(e.agent, e.actor, e.details["claimed"]) for e in refused] == [
        ("db-1", "agent:db-1", "web-1")
    ]
    assert not (await env.admin.get_agent("web-1")).connected
    assert not (await env.admin.get_agent("db-1")).connected


async def test_no_or_bad_credential(env: Env) -> None:
    for credential in ["", "jma_forged", env.credentials["db-1"] + "x"]:
        async with agent_link(env.address, credential) as link:
            # Refused before the coordinator reads anything (a Hello written now could race the
            # end of the stream).
            assert await link.ended() is grpc.StatusCode.UNAUTHENTICATED


async def test_first_message_must_be_hello(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.ack(1, "grt-" + "0" * 32)
        assert await link.ended() is grpc.StatusCode.INVALID_ARGUMENT


async def test_expired_event_is_stored_once_and_acknowledged(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        request_id, grant_id = await approved_prod_grant(env)
        seq, _ = await link.command()
        await link.ack(seq, grant_id)
        await env.wait_grant_state(request_id, GrantState.ACTIVE)
        for _ in range(2):  # the agent's outbox resends until it sees the EventAck
            await link.send(
                event("6f1c0a52-0000-4000-8000-000000000001", "grant.expired", grant_id)
            )
            ack = await link.next("event_ack")
            assert list(ack.event_ack.event_ids) == ["6f1c0a52-0000-4000-8000-000000000001"]
    stored = await env.admin.list_audit(kind="agent.grant.expired")
    assert len(stored) == 1
    assert stored[0].id == "db-1:6f1c0a52-0000-4000-8000-000000000001"
    assert (stored[0].agent, stored[0].subject, stored[0].grant_id) == ("db-1", "alice", grant_id)
    assert stored[0].details["how"] == "timer"
    grant = await env.admin.get_grant(grant_id)
    assert grant.state is GrantState.EXPIRED
    assert (await env.admin.get_request(request_id)).state is RequestState.APPROVED
    assert (await env.admin.verify_audit()).ok


async def test_event_about_another_agents_grant_cuts_the_stream(env: Env) -> None:
    _, staging = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert staging is not None
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        await link.send(event("evt-forged-0001", "grant.expired", staging.id))
        assert await link.ended() is grpc.StatusCode.PERMISSION_DENIED
    assert await env.admin.list_audit(kind="agent.grant.expired") == []
    assert (await env.admin.get_grant(staging.id)).state is GrantState.PENDING_DELIVERY


async def test_event_without_an_id_is_refused(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        await link.send(event("", "drift.removed", ""))
        assert await link.ended() is grpc.StatusCode.INVALID_ARGUMENT
    assert await env.admin.list_audit(kind="agent.drift.removed") == []


async def test_ack_for_another_agents_command_changes_nothing(env: Env) -> None:
    request, staging = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert staging is not None
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.hello("db-1")
        await link.ack(staging.grant_seq, staging.id)
        # An event round trip proves the ack before it was processed.
        await link.send(event("evt-sync-0001", "heartbeat.note", ""))
        await link.next("event_ack")
    assert (await env.admin.get_grant(staging.id)).state is GrantState.PENDING_DELIVERY
    assert (await env.admin.get_agent("db-1")).last_acked_seq == 0
    assert request.grant_id == staging.id


async def test_the_same_event_id_from_two_agents_is_stored_twice(env: Env) -> None:
    """Deduplication is per agent: an agent cannot swallow another's events by reusing ids."""
    for agent in ("web-1", "db-1"):
        async with agent_link(env.address, env.credentials[agent]) as link:
            await link.hello(agent)
            await link.send(event("evt-shared-1", "note", ""))
            ack = await link.next("event_ack")
            assert list(ack.event_ack.event_ids) == ["evt-shared-1"]
    stored = await env.admin.list_audit(kind="agent.note")
    assert sorted(e.id for e in stored) == ["db-1:evt-shared-1", "web-1:evt-shared-1"]
