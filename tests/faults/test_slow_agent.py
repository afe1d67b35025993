"""A stopped agent (nothing read from its stream) is cut off by the coordinator once its bounded
per-agent queue is full, instead of growing the coordinator's memory; when it reads again it
reconnects and resyncs from the command log, and every grant reaches it. Latency on the link
slows delivery but loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import Client
from server.app import build
from server.config import CoordinatorConfig

from .harness import HOLD, Cluster, wait_in_force
from .results import Recorder

pytestmark = pytest.mark.subprocess


async def test_stopped_agent_is_cut_off_and_resyncs(tmp_path: Path, recorder: Recorder) -> None:
    from server.__main__ import _dev_setup

    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        port=0,
        agent_queue_limit=10,
        heartbeat=timedelta(seconds=1),
        keepalive=timedelta(seconds=2),
        keepalive_timeout=timedelta(seconds=1),
        default_policy="version: 1\nactions: [deploy]\nrules: []\n",
    )
    coordinator = await build(config)
    await _dev_setup(coordinator)
    runner = asyncio.create_task(coordinator.run())
    cluster = Cluster(tmp_path, recorder, port=coordinator.port)
    try:
        from tests.e2e.procs import read_env

        cluster.env = read_env(tmp_path / "coordinator" / "dev.env")
        await cluster.apply_policy()
        web = await cluster.start_agent("web-1")
        await cluster.wait_connected("web-1")
        alice = await cluster.client("alice")
        web.proxy.stall()
        recorder.fault("agent_stopped")
        sent = 0
        async with asyncio.timeout(120):
            while coordinator.registry.connected("web-1"):
                await grant_and_revoke(cluster, alice, sent)
                sent += 1
        recorder.fault("slow_agent_cut_off")
        web.proxy.heal()
        web.proxy.latency = 0.05
        recorder.fault("latency")
        await cluster.wait_connected("web-1", timeout=60)
        last = ("alice", HOLD[0])
        await cluster.grant(alice, "web-1", HOLD[0], 300)
        await wait_in_force(web.oracle, last, timeout=60)
        history = web.oracle.history()
        assert all(history.double_applies(p) == 0 for p in history.events)
        assert sent > 0
    finally:
        await cluster.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def grant_and_revoke(cluster: Cluster, alice: Client, i: int) -> None:
    _, grant = await alice.create_request(
        agent="web-1", action=HOLD[1 + i % 50], duration=timedelta(minutes=5), reason="slow"
    )
    assert grant is not None
    cluster.recorder.issued()
