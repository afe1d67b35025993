"""1,000 agents (one connection each, in this process) come back after the coordinator is
SIGKILLed and restarted: all of them, none left behind, within the reconnect backoff cap."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from tests.support.swarm import Swarm, SwarmSettings

from .harness import Cluster
from .results import Recorder

pytestmark = pytest.mark.subprocess


# Enrolling and connecting thousands of agents in one process takes longer than the default.
@pytest.mark.timeout(900)
async def test_reconnect_storm_after_coordinator_restart(
    tmp_path: Path, recorder: Recorder, long_run: bool
) -> None:
    count = 2000 if long_run else 1000
    cluster = Cluster(tmp_path, recorder)
    await cluster.start_coordinator()
    swarm = Swarm(
        SwarmSettings(
            target=cluster.address,
            join_token=cluster.env["JITMESH_JOIN_TOKEN"],
            count=count,
            credentials_dir=tmp_path / "swarm",
            backoff_base=0.2,
            backoff_cap=5.0,
            # Slower pings than the single agents' 2 s / 1 s: thousands of links in one busy
            # process time out on their own at that rate. The killed coordinator is noticed by
            # its closed sockets or, at the latest, by a missed ping.
            keepalive_time=5.0,
            keepalive_timeout=2.0,
        )
    )
    runner = asyncio.create_task(swarm.run())
    try:
        await swarm.wait_connected(count, within=600)
        assert cluster.coordinator is not None
        cluster.coordinator.kill()
        recorder.fault("coordinator_sigkill")
        await swarm.wait_disconnected(within=30)
        started = time.monotonic()
        await cluster.start_coordinator()
        try:
            await swarm.wait_connected(count, within=120)
        finally:
            took = time.monotonic() - started
            left = count - swarm.connected()
            recorder.storm(agents=count, seconds=took, left_behind=left)
        assert left == 0, swarm.disconnected_names()[:10]
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await cluster.close()
