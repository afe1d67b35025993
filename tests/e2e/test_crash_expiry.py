"""The coordinator is killed with SIGKILL while a grant is in force; the agent expires the grant
on its own meanwhile; after the coordinator restarts, the agent's expiry is in the audit log."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState

from .procs import Proc, agent, check, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess


async def test_agent_expires_grant_while_coordinator_is_down(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    access = tmp_path / "access"
    access.mkdir()
    coord.start()
    web: Proc | None = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        web = agent(
            address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "web-1", access
        )
        web.start()
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            await wait_for_agent(alice, "web-1")
            request, grant = await alice.create_request(
                agent="web-1", action="deploy", duration=timedelta(seconds=4), reason="test"
            )
            assert grant is not None
            await alice.wait_for_request(
                request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
            )
        assert check(tmp_path / "web-1", "alice", "deploy") == 0
        marker = access / "alice:deploy"
        assert marker.exists()

        coord.kill()  # SIGKILL: no clean shutdown, no chance to record anything more

        await wait_for(lambda: not marker.exists(), 20, "the agent to remove the expired access")
        assert check(tmp_path / "web-1", "alice", "deploy") == 1

        coord.start()
        await wait_healthy(address)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:

            async def expiry_reported() -> bool:
                events = await admin.list_audit(since=None, grant_id=grant.id)
                return any(e.kind == "agent.grant.expired" for e in events)

            async with asyncio.timeout(30):
                while not await expiry_reported():
                    await asyncio.sleep(0.05)
            stored = await admin.get_grant(grant.id)
            assert stored.state is GrantState.EXPIRED
            verification = await admin.verify_audit()
            assert verification.ok, verification.problem
    finally:
        if web is not None:
            web.stop()
        coord.stop()


async def wait_for_agent(client: Client, name: str) -> None:
    async with asyncio.timeout(20):
        while True:
            agents = {a.name: a for a in await client.list_agents()}
            if name in agents and agents[name].connected:
                return
            await asyncio.sleep(0.05)
