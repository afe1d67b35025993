"""The agent stream under attack, at the wire: agent A naming agent B's grants in acks and events,
oversized messages, and a client that opens and cancels streams as fast as it can while another
agent stays served."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc

from jitmesh.v1 import agentlink_pb2, agentlink_pb2_grpc
from tests.server.helpers import Env, agent_link, bearer, channel

MIN = timedelta(minutes=1)


async def db1_grant(env: Env) -> str:
    request, _ = await env.bob.create_request(
        agent="db-1", action="logs", duration=5 * MIN, reason="INC-1"
    )
    await env.carol.approve(request.id)
    grants = [g for g in await env.admin.list_grants() if g.request_id == request.id]
    return grants[0].id


async def test_an_event_naming_another_agents_grant_cuts_the_stream(env: Env) -> None:
    grant_id = await db1_grant(env)
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        await link.send(
            agentlink_pb2.AgentMessage(
                event=agentlink_pb2.AgentEvent(
                    event_id="evt-forged-1", kind="grant.expired", grant_id=grant_id
                )
            )
        )
        assert await link.ended() == grpc.StatusCode.PERMISSION_DENIED
    # db-1's grant was not ended by web-1's claim.
    assert not (await env.admin.get_grant(grant_id)).state.terminal
    refused = await env.admin.list_audit(since=None, kind="agent.impersonation_refused")
    assert [(e.agent, e.details["claimed"], e.details["via"]) for e in refused] == [
        ("web-1", "db-1", "event")
    ]


async def test_an_ack_for_another_agents_command_changes_nothing(env: Env) -> None:
    grant_id = await db1_grant(env)
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        await link.ack(1, grant_id)  # db-1's first command is seq 1 in db-1's log
        await link.ack(1, grant_id, agentlink_pb2.ACK_STATUS_FAILED)
    grant = await env.admin.get_grant(grant_id)
    assert grant.state.name == "PENDING_DELIVERY"


async def test_oversized_agent_messages_end_the_stream(env: Env) -> None:
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        await link.send(
            agentlink_pb2.AgentMessage(
                event=agentlink_pb2.AgentEvent(
                    event_id="evt-big-1", kind="x", details={"k": "v" * (100 * 1024)}
                )
            )
        )
        assert await link.ended() == grpc.StatusCode.INVALID_ARGUMENT
    events = await env.admin.list_audit(since=None)
    assert not [e for e in events if e.id.endswith("evt-big-1")]


async def test_rapid_stream_open_and_cancel_leaves_other_agents_served(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as steady:
        await steady.hello("db-1")
        async with channel(env.address) as ch:
            stub = agentlink_pb2_grpc.AgentLinkStub(ch)
            for i in range(200):
                call = stub.Connect(None, metadata=bearer(env.credentials["web-1"]))
                if i % 2:
                    await call.write(
                        agentlink_pb2.AgentMessage(hello=agentlink_pb2.Hello(agent="web-1"))
                    )
                call.cancel()
        # The steady agent still receives its commands at once.
        request, _ = await env.bob.create_request(
            agent="db-1", action="logs", duration=5 * MIN, reason="INC-2"
        )
        await env.carol.approve(request.id)
        seq, body = await steady.command()
        assert (seq, body.agent, body.grant.action) == (1, "db-1", "logs")
    async with asyncio.timeout(10):
        while env.coordinator.registry.connected("web-1"):
            await asyncio.sleep(0.01)
