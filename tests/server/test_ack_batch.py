"""Acks from many agents are written together (group commit) with the same outcome as one by
one: every grant moves exactly as its ack says, every ack is audited once."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from datetime import timedelta

from jitmesh import Grant, GrantState, Request
from jitmesh.v1 import agentlink_pb2
from server.domain.models import ADMIN_GROUP, AckStatus, AgentAck, Principal
from tests.server.helpers import AgentLink, Env, agent_link, raw_sql
from tests.server.test_agentlink import event

M15 = timedelta(minutes=15)
ADMIN = Principal("admin", frozenset({ADMIN_GROUP}))


async def applied_then_revoked(env: Env, link: AgentLink) -> tuple[Request, Grant, int]:
    """alice's grant on web-1, applied and acked, then revoked: its request, the grant and the
    revoke command's sequence number (the revoke is read off the stream, not yet acked)."""
    await link.hello("web-1")
    request, grant = await env.alice.create_request(agent="web-1", action="deploy", duration=M15)
    assert grant is not None
    await link.command()
    await link.ack(1, grant.id)
    await env.wait_grant_state(request.id, GrantState.ACTIVE)
    await env.admin.revoke_grant(grant.id, reason="incident")
    seq, _ = await link.command()
    return request, grant, seq


async def test_acks_from_many_agents_land_in_few_commits(env: Env) -> None:
    names = [f"app-{i}" for i in range(12)]
    for name in names:
        join, _ = await env.coordinator.fleet.create_join_token(ADMIN, {"env": "staging"}, None)
        _, env.credentials[name] = await env.coordinator.fleet.enroll(join, name, {})
    async with AsyncExitStack() as stack:
        links = [
            await stack.enter_async_context(agent_link(env.address, env.credentials[n]))
            for n in names
        ]
        for name, link in zip(names, links, strict=True):
            await link.hello(name)
        grants, requests = {}, {}
        for name in names:
            request, grant = await env.alice.create_request(
                agent=name, action="deploy", duration=M15
            )
            assert grant is not None
            grants[name], requests[name] = grant.id, request.id
        for link in links:
            assert (await link.command())[0] == 1
        # Half apply, half fail. The store's writer is kept busy while the acks arrive on
        # their own streams, as under load: they queue up and are written together after it.
        statuses = [
            agentlink_pb2.ACK_STATUS_APPLIED if i % 2 else agentlink_pb2.ACK_STATUS_FAILED
            for i in range(len(names))
        ]
        fleet = env.coordinator.fleet
        async with env.coordinator.store.transaction():
            commits = env.coordinator.store.commits
            for name, link, status in zip(names, links, statuses, strict=True):
                await link.ack(1, grants[name], status)
            async with asyncio.timeout(10):
                while fleet.acks_waiting < len(names):
                    await asyncio.sleep(0.01)
        for name in names:
            await env.wait_grant_state(requests[name], GrantState.ACTIVE)
        states = [(await env.admin.get_grant(grants[n])).state for n in names]
        assert states == [
            GrantState.ACTIVE if i % 2 else GrantState.FAILED for i in range(len(names))
        ]
        # The busy transaction, the first ack's batch (taken before the writer was free), and
        # one batch for the other eleven.
        assert env.coordinator.store.commits - commits == 3
        # A repeated ack changes nothing and is not audited again.
        await links[1].ack(1, grants[names[1]], agentlink_pb2.ACK_STATUS_FAILED)
        await links[1].ack(1, grants[names[1]], agentlink_pb2.ACK_STATUS_APPLIED)
    applied = await env.admin.list_audit(kind="grant.applied")
    failed = await env.admin.list_audit(kind="grant.apply_failed")
    assert sorted(e.agent for e in applied) == sorted(names[1::2])
    assert sorted(e.agent for e in failed) == sorted(names[0::2])
    assert (await env.admin.get_grant(grants[names[1]])).state is GrantState.ACTIVE
    assert (await env.admin.verify_audit()).ok


async def test_grant_and_revoke_acked_in_one_batch_end_revoked(env: Env) -> None:
    """The grant's apply ack and its revoke ack arrive together: the grant ends REVOKED, as it
    would ack by ack (ACTIVE is skipped only because the revoke came first)."""
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        await link.hello("web-1")
        request, grant = await env.alice.create_request(
            agent="web-1", action="deploy", duration=M15
        )
        assert grant is not None
        await link.command()
        await env.admin.revoke_grant(grant.id, reason="changed my mind")
        seq, body = await link.command()
        assert body.WhichOneof("kind") == "revoke"
        await link.ack(1, grant.id)
        await link.ack(seq, grant.id)
        await env.wait_grant_state(request.id, GrantState.REVOKED)
    ended = await env.admin.get_grant(grant.id)
    assert ended.state is GrantState.REVOKED
    kinds = [e.kind for e in await env.admin.list_audit(grant_id=grant.id)]
    assert kinds[-2:] == ["grant.applied", "grant.revoked"]


async def test_a_revoke_that_failed_and_later_succeeded_ends_revoked(env: Env) -> None:
    """The agent could not remove the access (REVOKE_FAILED); the revoke reaches it again after
    its restart and the removal works: the same command's APPLIED ack ends the grant REVOKED.
    A grant command's later ack changes nothing (its first ack stands)."""
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        request, grant, seq = await applied_then_revoked(env, link)
        await link.ack(seq, grant.id, agentlink_pb2.ACK_STATUS_FAILED)
        await env.wait_grant_state(request.id, GrantState.REVOKE_FAILED)
        await link.ack(seq, grant.id)
        await env.wait_grant_state(request.id, GrantState.REVOKED)
        await link.ack(1, grant.id, agentlink_pb2.ACK_STATUS_FAILED)
        # Acks and events are read in order: once this event is acknowledged, so was that ack.
        await link.send(event("evt-after-1", "note", ""))
        await link.next("event_ack")
    assert (await env.admin.get_grant(grant.id)).state is GrantState.REVOKED
    kinds = [e.kind for e in await env.admin.list_audit(grant_id=grant.id)]
    assert kinds[-2:] == ["grant.revoke_failed", "grant.revoked"]
    assert "grant.apply_failed" not in kinds


async def test_the_same_command_acked_twice_in_one_batch_counts_in_order(env: Env) -> None:
    """Two acks of one revoke land in one batch (an agent's old and new stream), FAILED then
    APPLIED: as one by one, the grant ends REVOKED and the command row says APPLIED."""
    fleet = env.coordinator.fleet
    async with agent_link(env.address, env.credentials["web-1"]) as link:
        _, grant, seq = await applied_then_revoked(env, link)
    web = Principal("web-1", frozenset())
    async with env.coordinator.store.transaction():
        acks = [
            asyncio.create_task(fleet.ack(web, AgentAck(seq, AckStatus(status), "", grant.id)))
            for status in ("FAILED", "APPLIED")
        ]
        async with asyncio.timeout(10):
            while fleet.acks_waiting < 2:
                await asyncio.sleep(0.01)
    await asyncio.gather(*acks)
    assert (await env.admin.get_grant(grant.id)).state is GrantState.REVOKED
    rows = raw_sql(
        env.coordinator.config.data_dir / "coordinator.db", "SELECT seq, ack_status FROM commands"
    )
    assert (seq, "APPLIED") in rows
    kinds = [e.kind for e in await env.admin.list_audit(grant_id=grant.id)]
    assert kinds[-2:] == ["grant.revoke_failed", "grant.revoked"]
