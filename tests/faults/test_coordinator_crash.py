"""The coordinator is killed at each step of an approval (test-only crash points): before the
commit, after the commit (before the push), after the agent applied (before its ack is
recorded) and after the ack. Afterwards the grant is applied at most once, in force only if it
was committed, and still ends on time."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path

import pytest

from jitmesh import GrantState, JitmeshError

from .harness import HOLD, MARGIN_MS, Cluster, audit_settled, record_pairs, wait_removed
from .results import Recorder

pytestmark = pytest.mark.subprocess

POINTS = ["before_commit", "after_commit", "after_push", "after_ack"]
# Outlasts the restart (5-6 s under load): a committed grant must reach the agent while it
# still holds, or there is nothing to apply once and remove on time.
GRANT = timedelta(seconds=15)


@pytest.mark.parametrize("point", POINTS)
async def test_coordinator_killed_during_an_approval(
    tmp_path: Path, recorder: Recorder, point: str
) -> None:
    cluster = Cluster(tmp_path, recorder)
    try:
        await cluster.start_coordinator()
        await cluster.apply_policy()
        web = await cluster.start_agent("web-1")
        await cluster.wait_connected("web-1")
        await cluster.drop_clients()
        assert cluster.coordinator is not None
        cluster.coordinator.stop()
        await cluster.start_coordinator(crash_at=point)
        await cluster.wait_connected("web-1")
        alice = await cluster.client("alice")
        pair = ("alice", HOLD[0])
        with contextlib.suppress(JitmeshError):
            await alice.create_request(
                agent="web-1", action=HOLD[0], duration=GRANT, reason="crash"
            )
        assert await cluster.coordinator.exited() == 137
        recorder.fault(f"coordinator_crash_{point}")
        await cluster.drop_clients()
        await cluster.start_coordinator()
        await cluster.wait_connected("web-1")
        admin = await cluster.client("admin")
        grants = await admin.list_grants(agent="web-1")
        if point == "before_commit":
            assert grants == []
            assert web.oracle.history().applies(pair) == []
            return
        assert len(grants) == 1
        recorder.issued()
        grant = await cluster.wait_grant(
            admin, grants[0].id, {GrantState.ACTIVE, GrantState.EXPIRED}, timeout=30
        )
        await wait_removed(web.oracle, pair, GRANT.total_seconds() + 30)
        overstays = record_pairs(recorder, web.oracle, {pair: grant}, phase="connected")
        assert web.oracle.history().double_applies(pair) == 0
        assert len(web.oracle.history().applies(pair)) == 1
        assert max(overstays) <= MARGIN_MS, overstays
        await audit_settled(recorder, admin, {grant.id: "agent.grant.expired"})
    finally:
        await cluster.close()
