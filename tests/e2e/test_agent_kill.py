"""An acknowledged grant survives a SIGKILL of the agent that acked it.

The agent commits its lease table with `PRAGMA synchronous=NORMAL` in WAL mode: a commit is in the
WAL file (the operating system's cache) before the ack leaves, so a killed process loses nothing
it acknowledged; only a power cut can lose the newest commits (docs/performance.md). Here the
agent is killed with a real SIGKILL as soon as the coordinator has recorded the ack, and the
table it leaves behind is read by `jitmesh-agent check` and directly.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState

from .procs import agent, check, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

ACTIONS = ("deploy", "restart", "logs")


async def test_acked_grants_survive_sigkill(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord = coordinator(tmp_path / "coordinator", port)
    access = tmp_path / "access"
    access.mkdir()
    state = tmp_path / "web-1"
    coord.start()
    web = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (tmp_path / "coordinator" / "dev.env").exists(), 20, "dev.env")
        env = read_env(tmp_path / "coordinator" / "dev.env")
        web = agent(address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], state, access)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            grants = []
            # Each round: a fresh agent process on the same state, one grant, acked, killed.
            for action in ACTIONS:
                web.start()
                await wait_connected(alice, "web-1")
                request, grant = await alice.create_request(
                    agent="web-1", action=action, duration=timedelta(minutes=30)
                )
                assert grant is not None
                await alice.wait_for_request(
                    request.id, until=lambda r: r.grant_state is GrantState.ACTIVE, timeout=20
                )
                web.kill(signal.SIGKILL)
                assert web.popen is not None
                assert web.popen.returncode == -signal.SIGKILL
                grants.append(grant.id)
                assert check(state, "alice", action) == 0
        db = sqlite3.connect(state / "agent.db")
        try:
            rows = dict(
                db.execute(
                    "SELECT grant_id, state FROM leases WHERE applied_at_ms IS NOT NULL"
                ).fetchall()
            )
        finally:
            db.close()
        assert {gid: rows.get(gid) for gid in grants} == dict.fromkeys(grants, "active")
        assert {p.name for p in access.iterdir()} == {f"alice:{a}" for a in ACTIONS}
    finally:
        if web is not None:
            web.stop()
        coord.stop()


async def wait_connected(client: Client, name: str) -> None:
    async with asyncio.timeout(20):
        while True:
            agents = {a.name: a for a in await client.list_agents()}
            if name in agents and agents[name].connected:
                return
            await asyncio.sleep(0.05)
