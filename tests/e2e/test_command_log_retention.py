"""Command-log retention with real processes: a coordinator truncating every agent's log behind
its acknowledged position (`--command-log-retention`), and a real agent that keeps converging:
after a stream of grants, after a restart with commands waiting for it, and after its lease
table was put back to a copy older than the truncated log (a snapshot then replaces what it
missed)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState

from .procs import agent, check, coordinator, free_port, read_env, wait_for, wait_healthy

pytestmark = pytest.mark.subprocess

M30 = timedelta(minutes=30)


def log_of(db: Path, name: str) -> tuple[int, int, int]:
    """(commands kept, log_start, last_seq) of the agent, read from the coordinator's store."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (kept,) = conn.execute("SELECT COUNT(*) FROM commands WHERE agent = ?", [name]).fetchone()
        start, last = conn.execute(
            "SELECT log_start, last_seq FROM agents WHERE name = ?", [name]
        ).fetchone()
    finally:
        conn.close()
    return int(kept), int(start), int(last)


async def wait_state(client: Client, grant_id: str, state: GrantState) -> None:
    async with asyncio.timeout(30):
        while (await client.get_grant(grant_id)).state is not state:
            await asyncio.sleep(0.05)


async def wait_connected(client: Client, name: str, boot_after: int) -> None:
    """Connected again, by a Hello recorded after the `boot_after`-th one."""
    async with asyncio.timeout(30):
        while True:
            hellos = await client.list_audit(agent=name, kind="agent.connected")
            if len(hellos) > boot_after and (await client.get_agent(name)).connected:
                return
            await asyncio.sleep(0.05)


async def test_the_log_stays_bounded_and_a_returning_agent_converges(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = tmp_path / "coordinator"
    db = data / "coordinator.db"
    coord = coordinator(data, port, "--command-log-retention", "0.2")
    access = tmp_path / "access"
    access.mkdir()
    state = tmp_path / "web-1"
    coord.start()
    web = None
    try:
        await wait_healthy(address)
        await wait_for(lambda: (data / "dev.env").exists(), 20, "dev.env")
        env = read_env(data / "dev.env")
        web = agent(address, "web-1", "env=staging", env["JITMESH_JOIN_TOKEN"], state, access)
        web.start()
        async with (
            await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice,
            await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin,
        ):
            await wait_connected(admin, "web-1", 0)
            # A stream of grants, each applied and released: 60 commands in all.
            for _ in range(30):
                _, grant = await alice.create_request(agent="web-1", action="deploy", duration=M30)
                assert grant is not None
                await wait_state(alice, grant.id, GrantState.ACTIVE)
                await alice.release_grant(grant.id)
                await wait_state(alice, grant.id, GrantState.RELEASED)
            # Everything was acknowledged: the log empties, its start at the last command.
            await wait_for(lambda: log_of(db, "web-1") == (0, 60, 60), 30, "an empty log")

            # A grant held across what follows, and a copy of the agent's lease table now.
            _, held = await alice.create_request(agent="web-1", action="logs", duration=M30)
            assert held is not None
            await wait_state(alice, held.id, GrantState.ACTIVE)
            web.stop()
            old = tmp_path / "web-1-old"
            shutil.copytree(state, old)

            # Away: a grant waits for it, and the held one is released. The log keeps both.
            _, waiting = await alice.create_request(agent="web-1", action="restart", duration=M30)
            assert waiting is not None
            await alice.release_grant(held.id)
            await wait_for(lambda: log_of(db, "web-1") == (2, 61, 63), 30, "62 and 63 kept")
            web.start()
            await wait_connected(admin, "web-1", 1)
            await wait_state(alice, waiting.id, GrantState.ACTIVE)
            await wait_state(alice, held.id, GrantState.RELEASED)
            await wait_for(lambda: log_of(db, "web-1") == (0, 63, 63), 30, "the log truncated")
            assert markers(access) == {"alice:restart"}

            # Its lease table goes back to the copy (seq 61: `logs` held, `restart` unknown):
            # the commands after it are gone from the log, so its Hello gets a snapshot.
            web.stop()
            shutil.rmtree(state)
            shutil.copytree(old, state)
            web.start()
            await wait_connected(admin, "web-1", 2)
            hello = (await admin.list_audit(agent="web-1", kind="agent.connected"))[-1]
            assert hello.details["last_applied_seq"] == "61"
            # One command more and no grant more: the snapshot, acked and truncated in turn.
            await wait_for(lambda: log_of(db, "web-1") == (0, 64, 64), 30, "the snapshot acked")
            web.stop()
        # Converged: `restart` held, `logs` not, exactly as the coordinator has it.
        assert check(state, "alice", "restart") == 0
        assert check(state, "alice", "logs") != 0
        assert markers(access) == {"alice:restart"}
    finally:
        if web is not None:
            web.stop()
        coord.stop()


def markers(access: Path) -> set[str]:
    """The markers in force (not the file enforcer's spares: dot files)."""
    return {p.name for p in access.iterdir() if not p.name.startswith(".")}
