"""The agent's own metrics as an operator scrapes them: a real coordinator and a real agent
(processes), the agent's --metrics-listen endpoint read over HTTP and parsed with Prometheus'
text parser. A grant that expires shows in the overstay histogram; an enforcer that cannot
write shows in the failures counter, by enforcer kind and operation."""

from __future__ import annotations

import asyncio
import urllib.error
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client, GrantState
from jitmesh import telemetry as t
from tests.e2e import procs
from tests.e2e.procs import free_port, read_env, wait_for, wait_healthy
from tests.ops.test_telemetry import Samples, scrape, value

pytestmark = pytest.mark.subprocess

OVERSTAY = t.AGENT_EXPIRY_OVERSTAY
FAILURES = t.AGENT_ENFORCER_FAILURES + "_total"


def scrape_up(port: int) -> Samples:
    """The samples, or none while the endpoint is not listening yet."""
    try:
        return scrape(port)
    except urllib.error.URLError:
        return {}


async def wait_state(client: Client, grant_id: str, state: GrantState) -> None:
    async with asyncio.timeout(30):
        while (await client.get_grant(grant_id)).state is not state:
            await asyncio.sleep(0.05)


async def test_overstay_and_enforcer_failures_on_the_agent_endpoint(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    coordinator = procs.coordinator(tmp_path / "coordinator", port)
    coordinator.start()
    agent = None
    try:
        await wait_healthy(address)
        env_file = tmp_path / "coordinator" / "dev.env"
        await wait_for(env_file.exists, 30, "dev.env")
        env = read_env(env_file)
        access = tmp_path / "access"
        access.mkdir()
        agent = procs.agent(
            address, "stage-1", "env=staging", env["JITMESH_JOIN_TOKEN"], tmp_path / "state",
            access, "--metrics-listen", f"127.0.0.1:{metrics}",
        )  # fmt: skip
        agent.start()
        await wait_for(lambda: value(scrape_up(metrics), t.AGENT_CONNECTED) == 1, 30, "connected")
        before = scrape(metrics)
        assert value(before, OVERSTAY + "_count") == 0
        assert not [name for name, _ in before if name == FAILURES]

        async with await Client.connect(address, token=env["JITMESH_TOKEN_ALICE"]) as alice:
            # A grant of two seconds: applied, then ended by the agent's expiry sweep.
            _, grant = await alice.create_request(
                agent="stage-1", action="deploy", duration=timedelta(seconds=2)
            )
            assert grant is not None
            await wait_state(alice, grant.id, GrantState.EXPIRED)
            samples = scrape(metrics)
            assert value(samples, OVERSTAY + "_count") == 1
            # The sweep runs within a second of the end (its longest nap), with room for load.
            assert 0 <= value(samples, OVERSTAY + "_sum") < 30
            assert value(samples, OVERSTAY + "_bucket", le="+Inf") == 1

            # The marker directory becomes a file: the file enforcer cannot write its marker,
            # the apply fails (and so does its roll-back's remove), the grant FAILED. The
            # expired grant left no marker, only the pair's spare (`agent/enforcers/file.py`).
            assert [path.name for path in access.iterdir()] == [".alice:deploy.spare"]
            (access / ".alice:deploy.spare").unlink()
            access.rmdir()
            access.write_text("not a directory\n")
            _, broken = await alice.create_request(
                agent="stage-1", action="restart", duration=timedelta(minutes=15)
            )
            assert broken is not None
            await wait_state(alice, broken.id, GrantState.FAILED)
        samples = scrape(metrics)
        assert value(samples, FAILURES, enforcer="file", operation="apply") == 1
        assert value(samples, FAILURES, enforcer="file", operation="remove") == 1
        assert value(samples, OVERSTAY + "_count") == 1
    finally:
        if agent is not None:
            agent.stop()
        coordinator.stop()
