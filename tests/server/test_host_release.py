"""A grant ended on the host by `jitmesh-agent exec --release` (issue 15, item 1): the agent
reports `grant.removed` with reason `released`, and the coordinator's record follows as for a
release asked of it (REVOKING with a revoke, RELEASED on the agent's ack) instead of showing the
grant ACTIVE until its end. The subject's own release arriving after that is answered, not
refused. Driven at the wire with a raw AgentLink stream against the real coordinator."""

from __future__ import annotations

import asyncio

from jitmesh import GrantState
from jitmesh.v1 import agentlink_pb2
from tests.server.helpers import T0, AgentLink, Env, agent_link
from tests.server.test_record_truth import ack, barrier, hello, kinds, prod_grant, ts

A = agentlink_pb2


def removed(event_id: str, grant_id: str, **details: str) -> A.AgentMessage:
    return A.AgentMessage(
        event=A.AgentEvent(
            event_id=event_id,
            kind="grant.removed",
            grant_id=grant_id,
            observed_at=ts(T0),
            details=details,
        )
    )


async def command_and_event_ack(link: AgentLink) -> tuple[int, A.CommandBody]:
    """The revoke an event caused and the event's ack, in whichever order they come."""
    command: tuple[int, A.CommandBody] | None = None
    acked = False
    async with asyncio.timeout(20):
        while command is None or not acked:
            message = await link.call.read()
            assert isinstance(message, A.CoordinatorMessage), message
            found = message.WhichOneof("body")
            if found == "command":
                command = (message.command.seq, A.CommandBody.FromString(message.command.body))
            else:
                assert found in ("event_ack", "heartbeat"), found
                acked = acked or found == "event_ack"
    return command


async def test_a_release_on_the_host_ends_the_grant_in_the_record(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, grant_id = await prod_grant(env)
        seq, body = await link.command()
        assert body.WhichOneof("kind") == "grant"
        await link.send(ack(seq, A.ACK_STATUS_APPLIED, grant_id))
        await barrier(link, 1)
        assert (await env.admin.get_grant(grant_id)).state is GrantState.ACTIVE
        # The command ended on the host and the agent ended the grant there.
        await link.send(removed("rel-1", grant_id, reason="released"))
        seq, body = await command_and_event_ack(link)
        assert body.WhichOneof("kind") == "revoke"
        assert body.revoke.grant_id == grant_id
        assert body.revoke.reason == A.REVOKE_REASON_RELEASED
        assert (await env.admin.get_grant(grant_id)).state is GrantState.REVOKING
        # Delivered again (the agent did not see the event ack): nothing more happens.
        await link.send(removed("rel-1", grant_id, reason="released"))
        await link.next("event_ack")
        await link.send(ack(seq, A.ACK_STATUS_APPLIED, grant_id))
        await barrier(link, 2)
    grant = await env.admin.get_grant(grant_id)
    assert grant.state is GrantState.RELEASED
    assert grant.end_reason == "released"
    seen = await kinds(env, grant_id)
    assert seen.count("grant.releasing") == 1
    assert seen.count("grant.released") == 1
    assert "agent.grant.removed" in seen
    # The subject's own release (exec --release with credentials) comes after: answered.
    again = await env.clients["alice"].release_grant(grant_id)
    assert again.state is GrantState.RELEASED
    assert (await env.admin.verify_audit()).ok


async def test_other_removals_and_ended_grants_are_left_as_they_are(env: Env) -> None:
    async with agent_link(env.address, env.credentials["db-1"]) as link:
        await link.send(hello())
        await link.next("welcome")
        _, revoked = await prod_grant(env)
        _, held = await prod_grant(env)
        for _ in range(2):
            seq, body = await link.command()
            await link.send(ack(seq, A.ACK_STATUS_APPLIED, body.grant.grant_id))
        await barrier(link, 1)
        await env.admin.revoke_grant(revoked, reason="done")
        seq, body = await link.command()
        assert body.revoke.grant_id == revoked
        # The removal of a grant revoked here reports reason released only if the revoke said
        # so; either way a grant on its way out is not ended a second time.
        await link.send(removed("rel-2", revoked, reason="released"))
        await link.next("event_ack")
        # A removal for another reason (revoked, drift) moves nothing.
        await link.send(removed("rel-3", held, reason="revoked"))
        await link.next("event_ack")
        await link.send(ack(seq, A.ACK_STATUS_APPLIED, revoked))
        await barrier(link, 2)
    assert (await env.admin.get_grant(revoked)).state is GrantState.REVOKED
    assert (await env.admin.get_grant(held)).state is GrantState.ACTIVE
    assert "grant.releasing" not in await kinds(env, revoked)
    assert "grant.releasing" not in await kinds(env, held)
