"""The agent dies (test-only crash points, like SIGKILL at that exact step) after persisting a
grant, after applying it, after persisting a revoke and after removing the access. After the
restart each grant is applied exactly once and ends on time; each revoke takes effect and is
reported (P5)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jitmesh import GrantState

from .harness import HOLD, MARGIN_MS, Cluster, record_pairs, wait_in_force, wait_removed
from .results import Recorder

pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize("point", ["agent_after_record", "agent_after_apply"])
async def test_agent_crash_during_apply(tmp_path: Path, recorder: Recorder, point: str) -> None:
    cluster = Cluster(tmp_path, recorder)
    try:
        await cluster.start_coordinator()
        await cluster.apply_policy()
        web = await cluster.start_agent("web-1", crash_at=point)
        await cluster.wait_connected("web-1")
        alice = await cluster.client("alice")
        pair = ("alice", HOLD[0])
        grant = await cluster.grant(alice, "web-1", HOLD[0], 6)
        assert await web.process.exited() == 137
        killed = time.monotonic()
        recorder.fault(f"agent_crash_{point.removeprefix('agent_')}")
        await cluster.start_agent("web-1", new=False)
        await wait_in_force(web.oracle, pair)
        downtime = (time.monotonic() - killed) * 1000
        await cluster.wait_grant(alice, grant.id, {GrantState.ACTIVE, GrantState.EXPIRED})
        await wait_removed(web.oracle, pair, 20)
        over = record_pairs(
            recorder, web.oracle, {pair: grant}, phase="crash", downtime_ms=downtime
        )
        assert max(over) <= downtime + MARGIN_MS
        history = web.oracle.history()
        assert history.double_applies(pair) == 0
        assert len(history.applies(pair)) == 1
    finally:
        await cluster.close()


@pytest.mark.parametrize("point", ["agent_after_revoke_record", "agent_after_remove"])
async def test_agent_crash_during_revoke(tmp_path: Path, recorder: Recorder, point: str) -> None:
    cluster = Cluster(tmp_path, recorder)
    try:
        await cluster.start_coordinator()
        await cluster.apply_policy()
        web = await cluster.start_agent("web-1", crash_at=point)
        await cluster.wait_connected("web-1")
        alice = await cluster.client("alice")
        admin = await cluster.client("admin")
        pair = ("alice", HOLD[1])
        grant = await cluster.grant(alice, "web-1", HOLD[1], 120)
        await wait_in_force(web.oracle, pair)
        await admin.revoke_grant(grant.id, reason="faults")
        assert await web.process.exited() == 137
        recorder.fault(f"agent_crash_{point.removeprefix('agent_')}")
        await cluster.start_agent("web-1", new=False)
        await wait_removed(web.oracle, pair, 20)
        done = await cluster.wait_grant(admin, grant.id, {GrantState.REVOKED}, timeout=30)
        assert done.state is GrantState.REVOKED
        history = web.oracle.history()
        assert len(history.applies(pair)) == 1
        assert history.double_applies(pair) == 0
    finally:
        await cluster.close()
