"""`jitctl request watch` as a bot would run it: a real coordinator process, restarted while the
watcher runs; the watcher resubscribes from its cursor and prints every request that changed,
none lost (each one's latest state at least once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client
from tests.e2e import procs
from tests.e2e.procs import free_port, read_env, wait_healthy

M15 = timedelta(minutes=15)


async def _prod_requests(address: str, env: dict[str, str], n: int) -> list[str]:
    async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
        made = []
        for _ in range(n):
            request, _ = await alice.create_request(
                agent="db-1", action="deploy", duration=M15, reason="release"
            )
            made.append(request.id)
        return made


@pytest.mark.subprocess
async def test_request_watch_resumes_after_the_coordinator_restarts(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    coordinator = procs.coordinator(tmp_path / "coordinator", port)
    coordinator.start()
    agent = watcher = None
    try:
        await wait_healthy(address)
        env = read_env(tmp_path / "coordinator" / "dev.env")
        access = tmp_path / "access"
        access.mkdir()
        agent = procs.agent(
            address, "db-1", "env=prod", env["JITMESH_JOIN_TOKEN"], tmp_path / "state", access
        )
        agent.start()
        async with await Client.connect(address, token=env["JITMESH_TOKEN_ADMIN"]) as admin:
            async with asyncio.timeout(30):
                while not [a for a in await admin.list_agents() if a.name == "db-1"]:
                    await asyncio.sleep(0.05)
        watcher = await asyncio.create_subprocess_exec(
            str(procs.BIN / "jitctl"), "request", "watch", "-o", "json", "--after", "1",
            env={**os.environ, "JITMESH_COORDINATOR": address,
                 "JITMESH_TOKEN": env["JITMESH_TOKEN_BOB"]},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        latest: dict[str, str] = {}
        seqs: list[int] = []

        async def read_until(done: dict[str, str]) -> None:
            assert watcher is not None
            assert watcher.stdout is not None
            async with asyncio.timeout(30):
                while any(latest.get(rid) != state for rid, state in done.items()):
                    line = await watcher.stdout.readline()
                    assert line, "the watcher ended"
                    item = json.loads(line)
                    latest[item["id"]] = item["state"]
                    seqs.append(item["change_seq"])

        before = await _prod_requests(address, env, 2)
        await read_until({rid: "PENDING" for rid in before})
        # The coordinator goes away and comes back on the same directory.
        coordinator.kill(signal.SIGTERM)
        coordinator.start()
        await wait_healthy(address)
        after = await _prod_requests(address, env, 3)
        async with await Client.connect(address, token=env["JITMESH_TOKEN_BOB"]) as bob:
            await bob.deny(before[0], reason="not now")
            await bob.approve(after[0])
        await read_until(
            {before[0]: "DENIED", after[0]: "APPROVED", after[1]: "PENDING", after[2]: "PENDING"}
        )
        assert set(latest) == {*before, *after}
        # Cursors only go forward: nothing printed twice for the same change.
        assert seqs == sorted(seqs)
        assert len(seqs) == len(set(seqs))
    finally:
        if watcher is not None and watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        if agent is not None:
            agent.stop()
        coordinator.stop()
