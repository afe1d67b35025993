"""The swarm (many agents in one process, in-memory lease stores) against an in-process
coordinator: every agent connects on its own stream and receives and applies its grant."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

from jitmesh import GrantState
from tests.support.swarm import Swarm, SwarmSettings

from .conftest import JOIN_TOKEN, Mesh, wait_until


async def test_swarm_agents_connect_and_apply(mesh: Mesh, tmp_path: Path) -> None:
    swarm = Swarm(
        SwarmSettings(
            target=mesh.address,
            join_token=JOIN_TOKEN,
            count=5,
            credentials_dir=tmp_path / "swarm",
            backoff_base=0.05,
            backoff_cap=0.2,
        )
    )
    runner = asyncio.create_task(swarm.run())
    try:
        await swarm.wait_connected(5, within=20)
        assert mesh.coordinator.registry.count() == 5
        alice = mesh.client("alice")
        target = swarm.agents[3]
        request, grant = await alice.create_request(
            agent=target.name, action="deploy", duration=timedelta(minutes=5), reason="swarm"
        )
        assert grant is not None
        await alice.wait_for_request(
            request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=10
        )
        await wait_until(lambda: ("alice", "deploy") in target.enforcer.in_force)
        assert all(not a.enforcer.in_force for a in swarm.agents if a is not target)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
