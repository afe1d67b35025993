"""Delivery keeps up or pushes back (issue 16, item 5), with real processes.

Many callers flood one real agent process with short auto-approved grants, far more at once
than it can apply within their lifetime. The coordinator refuses the excess with
RESOURCE_EXHAUSTED and a retry hint (which the callers wait out, as the SDK does by default),
and every grant it answered "created" for is applied on the host before it ends: none expires
queued.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, RateLimitedError
from jitmesh.types import Grant

from .procs import agent, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

CALLERS = 64
FLOOD_SECONDS = 4.0
GRANT = timedelta(seconds=6)


async def test_a_flooded_agent_gets_every_accepted_grant_in_time(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    access = tmp_path / "access"
    access.mkdir()
    coord.start()
    web = None
    clients: list[Client] = []
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        web = agent(
            address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "web-1", access
        )
        web.start()
        admin = await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"])
        clients.append(admin)
        await _until(lambda: _connected(admin, "web-1"), 30)
        # No SDK retries here, so that each refusal is seen; the callers honour the hint.
        for _ in range(4):
            clients.append(
                await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"], pushback_wait=0)
            )
        accepted: list[Grant] = []
        refusals: list[RateLimitedError] = []
        stop = time.monotonic() + FLOOD_SECONDS

        async def caller(client: Client) -> None:
            while time.monotonic() < stop:
                try:
                    _, grant = await client.create_request(
                        agent="web-1", action="deploy", duration=GRANT
                    )
                except RateLimitedError as exc:
                    refusals.append(exc)
                    await asyncio.sleep(exc.retry_after or 0.1)
                    continue
                assert grant is not None
                accepted.append(grant)

        await asyncio.gather(*(caller(clients[1 + k % 4]) for k in range(CALLERS)))
        assert refusals, "the flood was refused at least once"
        # Every refusal carries its retry hint, for this agent.
        assert {(e.agent, e.retry_after is not None) for e in refusals} == {("web-1", True)}
        assert all(0 < (e.retry_after or 0) <= 10 for e in refusals)
        assert accepted, "the agent got grants all the same"
        ids = {g.id for g in accepted}

        async def settled() -> dict[str, Grant]:
            listed = await admin.list_grants(subject="alice")
            return {
                g.id: g
                for g in listed
                if g.id in ids and (g.applied_at is not None or g.ended_at is not None)
            }

        await _until(lambda: _all(settled, len(ids)), GRANT.total_seconds() + 60)
        final = await settled()
        late = [g for g in final.values() if g.applied_at is None]
        assert not late, f"{len(late)} of {len(ids)} accepted grants expired undelivered"
        # Applied on the host before they ended.
        assert all(g.applied_at is not None and g.applied_at < g.not_after for g in final.values())
    finally:
        for client in clients:
            await client.close()
        if web is not None:
            web.stop()
        coord.stop()


async def _connected(admin: Client, name: str) -> bool:
    return any(a.name == name and a.connected for a in await admin.list_agents())


async def _all(settled: object, count: int) -> bool:
    return len(await settled()) == count  # type: ignore[operator]


async def _until(predicate: object, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.1)
